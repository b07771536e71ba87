"""Head diagnosis: per-head importance of a trained model over a sample of documents.

The library behind tools/diagnose_heads.py (docs/design.md, "The method" and "File formats
and contracts"):

    Imp[l, h] = sum over samples and counted tokens of G[t, h] / number of counted tokens

G is the variant's gate (vanilla: 1 - attention on the document's first token, which is itself
not counted; sink: sigmoid(lse - s_h); gated: the head gate). A sample is one document
truncated to ``seq_len`` tokens, in dataset order (or shuffled with a seed). The model is a
megasink checkpoint or a Hugging Face directory, converted in memory to megasink, whose forward
gives the gates from the flash kernel's log-sum-exp: no attention matrix is materialised.
Samples of equal length are batched (no padding, no masks); logits are never computed.

Outputs in ``--out``: ``importance.json`` (``layers``, ``heads``, ``importance`` [L][H], ``cv``
[L], ``shared_heads`` [L][m] when ``top_m`` > 0, readable by
``megasink.model.importance.shared_mask_from_file``), ``importance.png`` (heatmap with per-layer
CV) and ``summary.txt`` (the text printed by the CLI).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from megasink.config import ATTENTION_BACKENDS, MIN_ROUTED_HEADS
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

    @property
    def cv(self) -> torch.Tensor:
        """(L,) population std / mean of each layer's head importance."""
        return imp_lib.cv_squared(self.importance, torch.ones_like(self.importance, dtype=torch.bool)).sqrt()

    def shared_heads(self) -> list:
        """[L][top_m] head indices, most important first (ties: the lower head index first)."""
        if self.top_m <= 0:
            return []
        return imp_lib.top_m_indices(self.importance, self.top_m).tolist()


# --------------------------------------------------------------------------- model


def load_model(path: str | os.PathLike, tokenizer: Optional[str] = None):
    """(model, tokenizer path or None) from a megasink checkpoint or an HF directory.

    The model is a megasink Transformer, or, for an HF causal LM megasink cannot represent
    (e.g. Qwen3's QK-norm), the ``transformers`` model itself with eager attention (an
    ``HFEagerGates`` wrapper: vanilla gates from its attention probabilities, one layer at a time).
    """
    from megasink.hf.importer import import_model, is_hf_dir
    from megasink.hf.mapping import UnsupportedModelError
    from megasink.hf.tokenizer import HF_TOKENIZER_SUBDIR, find_spm_model

    if is_hf_dir(path):
        has_hf_tok = any((Path(path) / n).exists() for n in ("tokenizer.json", "tokenizer_config.json"))
        tok = tokenizer or (str(path) if has_hf_tok else None)
        try:
            model, _, _ = import_model(path, check=False, progress=False)
        except UnsupportedModelError as e:
            print(f"note: {e}\nnote: falling back to transformers' eager attention (vanilla gates)",
                  file=sys.stderr)
            return HFEagerGates.from_pretrained(path), tok
        return model, tok
    from megasink import load_checkpoint
    from megasink.checkpoint import resolve_checkpoint_dir

    ckpt = resolve_checkpoint_dir(path)
    model, cfg = load_checkpoint(ckpt)
    if tokenizer and Path(tokenizer).is_dir():
        return model, tokenizer
    spm = find_spm_model(ckpt, cfg.data.tokenizer, tokenizer)
    if spm is None and (ckpt / HF_TOKENIZER_SUBDIR).is_dir():
        return model, str(ckpt / HF_TOKENIZER_SUBDIR)
    return model, str(spm) if spm else None


DTYPES = ("float32", "bfloat16", "float16")


def forward_backend(backend: str, device: str | torch.device) -> str:
    """The attention route of a forward-only pass (diagnosis, ablation). ``auto``: the CPU flash
    kernel on the CPU; on CUDA PyTorch's memory-efficient SDPA kernel, which takes fp32 as well as
    half types and returns the log-sum-exp (no gradient is taken, so the lse gradient it drops
    does not matter). Any other name as given."""
    if backend == "auto":
        return "sdpa" if torch.device(device).type == "cuda" else "flash"
    return backend


def load_for_forward(path: str | os.PathLike, tokenizer: Optional[str], device: str, backend: str, dtype: str):
    """``load_model``, then the model on ``device`` in ``dtype`` (one of ``DTYPES``) with the
    attention route ``forward_backend`` picks (a megasink model; ``HFEagerGates`` keeps eager)."""
    model, tok = load_model(path, tokenizer)
    if not isinstance(model, HFEagerGates):
        model.cfg.attention_backend = forward_backend(backend, device)
    model.to(device)
    if dtype != "float32":
        model.to(getattr(torch, dtype))
    return model, tok


def add_forward_args(p: argparse.ArgumentParser, num_samples: int) -> None:
    """The options diagnosis and ablation share: the model, the documents (the same --data,
    --num-samples, --seq-len and --shuffle-seed give the same samples), the output folder and how
    the forward passes run."""
    p.add_argument("model", help="megasink checkpoint (run / checkpoints / step dir) or HF model directory")
    p.add_argument("--data", nargs="+", required=True,
                   help="indexed dataset prefixes (PREFIX.bin/.idx) or text files (.jsonl[.gz], .parquet)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-samples", type=int, default=num_samples, help=f"documents to use (default {num_samples})")
    p.add_argument("--seq-len", type=int, default=2048, help="truncate each document to this many tokens")
    p.add_argument("--shuffle-seed", type=int, help="sample documents in a seeded random order")
    p.add_argument("--tokenizer", help="sentencepiece .model or HF tokenizer dir (default: the model's own)")
    p.add_argument("--text-key", default="text", help="JSON / parquet field with the text (default text)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", choices=ATTENTION_BACKENDS,
                   help="attention kernel (default auto: flash on CPU, memory-efficient SDPA on CUDA)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="model weights dtype (default float32)")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="tokens per forward pass")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


class HFEagerGates:
    """A transformers causal LM read as vanilla attention: G = 1 - A[t, 0] from eager probabilities.

    Forward hooks on each ``self_attn`` reduce that layer's (B, H, T, T) probabilities to gate
    sums at once, so only one layer's attention matrix exists at a time.
    """

    def __init__(self, hf_model):
        self.hf = hf_model
        text_cfg = hf_model.config.get_text_config() if hasattr(hf_model.config, "get_text_config") \
            else hf_model.config
        self.attn_modules = [m for name, m in hf_model.named_modules() if name.endswith("self_attn")]
        self.n_layers, self.n_heads = len(self.attn_modules), text_cfg.num_attention_heads
        self.vocab_size = text_cfg.vocab_size
        self.variant = "vanilla"

    @classmethod
    def from_pretrained(cls, path):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager", dtype=torch.float32)
        return cls(model.eval())

    def to(self, device):
        self.hf.to(device)
        return self

    @torch.no_grad()
    def gate_sums(self, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
        """tokens (B, T) -> (gate sums (L, H) over t >= 1, counted tokens)."""
        sums = []

        def hook(module, inputs, output):
            probs = output[1]  # (B, H, T, T)
            sums.append((1.0 - probs[:, :, 1:, 0].double()).sum(dim=(0, 2)).cpu())  # (H,)

        handles = [m.register_forward_hook(hook) for m in self.attn_modules]
        try:
            self.hf(input_ids=tokens, use_cache=False, logits_to_keep=1)
        finally:
            for h in handles:
                h.remove()
        return torch.stack(sums), tokens.shape[0] * (tokens.shape[1] - 1)


# --------------------------------------------------------------------------- data

TEXT_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".parquet")


def _indexed_prefix(path: str) -> Optional[str]:
    for suffix in (".idx", ".bin"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
    return path if os.path.isfile(path + ".idx") and os.path.isfile(path + ".bin") else None


def _read_texts(path: str, text_key: str) -> Iterator[str]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(columns=[text_key]):
            yield from (t for t in batch.column(0).to_pylist() if t)
        return
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                text = json.loads(line).get(text_key)
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{n}: no string field {text_key!r} (use --text-key)")
                if text:
                    yield text


def _document_spans(ds) -> tuple[np.ndarray, np.ndarray]:
    """(start token offset, length) of each document: the run of sequences between document indices."""
    doc_idx = np.asarray(ds.document_indices, dtype=np.int64)  # (D + 1,)
    n_seq = len(ds.sequence_lengths)
    if len(doc_idx) < 2 or n_seq == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    seq_cum = np.concatenate([[0], np.cumsum(ds.sequence_lengths, dtype=np.int64)])  # (S + 1,)
    first = np.minimum(doc_idx[:-1], n_seq - 1)
    starts = np.asarray(ds.sequence_pointers, dtype=np.int64)[first] // ds.dtype.itemsize
    return starts, seq_cum[doc_idx[1:]] - seq_cum[doc_idx[:-1]]


class DocumentSource:
    """Documents of several inputs, in order: indexed datasets (token ids) or text files (encoded lazily)."""

    def __init__(self, paths: list, encode: Optional[Callable[[str], list]] = None, text_key: str = "text"):
        from megasink.data.indexed import IndexedDataset

        self.docs: list = []  # (kind, payload): ("tokens", (dataset, start, length)) or ("text", str)
        for path in paths:
            prefix = _indexed_prefix(str(path))
            if prefix is not None:
                ds = IndexedDataset(prefix)
                starts, lengths = _document_spans(ds)
                self.docs.extend(("tokens", (ds, int(s), int(n))) for s, n in zip(starts, lengths))
            elif str(path).endswith(TEXT_SUFFIXES):
                if encode is None:
                    raise ValueError(f"{path}: text input needs a tokenizer (none found with the model; "
                                     "pass --tokenizer)")
                self.docs.extend(("text", t) for t in _read_texts(str(path), text_key))
            else:
                raise FileNotFoundError(
                    f"{path}: neither an indexed dataset prefix (PREFIX.bin + PREFIX.idx) nor a text file "
                    f"({', '.join(TEXT_SUFFIXES)})")
        self.encode = encode

    def __len__(self) -> int:
        return len(self.docs)

    def tokens(self, i: int, seq_len: int) -> np.ndarray:
        kind, payload = self.docs[i]
        if kind == "tokens":
            ds, start, length = payload
            return np.asarray(ds.tokens[start : start + min(length, seq_len)], dtype=np.int64)
        return np.asarray(self.encode(payload)[:seq_len], dtype=np.int64)


def iter_samples(source: DocumentSource, num_samples: int, seq_len: int,
                 shuffle_seed: Optional[int] = None) -> Iterator[np.ndarray]:
    """Up to num_samples non-empty documents truncated to seq_len, in order or shuffled."""
    order = np.arange(len(source))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(source))
    taken = 0
    for i in order:
        if taken >= num_samples:
            return
        tokens = source.tokens(int(i), seq_len)
        if len(tokens):
            taken += 1
            yield tokens


# --------------------------------------------------------------------------- importance


@torch.no_grad()
def gate_statistics(model, samples, device: str = "cpu", max_batch_tokens: int = 16384,
                    progress: bool = False, total: Optional[int] = None) -> tuple[torch.Tensor, int, int]:
    """(gate sums (L, H) float64, counted tokens, samples) over samples, batching equal lengths."""
    from tqdm import tqdm

    from megasink.model.kernels import SeqInfo

    if isinstance(model, HFEagerGates):
        vocab, n_layers, n_heads = model.vocab_size, model.n_layers, model.n_heads
    else:
        model.eval()
        vocab, n_layers, n_heads = model.cfg.vocab_size, model.cfg.n_layers, model.cfg.n_heads
    sums = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    count, n = 0, 0
    buckets: dict[int, list] = {}

    def run(batch: list) -> None:
        nonlocal count
        tokens = torch.as_tensor(np.stack(batch), device=device)  # (B, T)
        if int(tokens.max()) >= vocab or int(tokens.min()) < 0:
            raise ValueError(f"token id {int(tokens.max())} outside the model's vocabulary ({vocab}): "
                             "data and model do not match")
        if isinstance(model, HFEagerGates):
            s, c = model.gate_sums(tokens)
        else:
            _, s, c = model.run_layers(model.embed(tokens), SeqInfo.build(tokens))  # no logits needed
            c = int(c.item())
        sums.add_(s.double().cpu())
        count += c

    with tqdm(total=total, desc="samples", disable=None if progress else True) as bar:  # None: a terminal only
        for tokens in samples:
            n += 1
            bucket = buckets.setdefault(len(tokens), [])
            bucket.append(tokens)
            if (len(bucket) + 1) * len(tokens) > max_batch_tokens:
                run(bucket)
                bar.update(len(bucket))
                buckets[len(tokens)] = []
        for bucket in buckets.values():
            if bucket:
                run(bucket)
                bar.update(len(bucket))
    return sums, count, n


def diagnose(model_path: str, data: list, num_samples: int = 500, seq_len: int = 2048, top_m: int = 0,
             shuffle_seed: Optional[int] = None, tokenizer: Optional[str] = None, text_key: str = "text",
             device: str = "cpu", backend: str = "auto", max_batch_tokens: int = 16384,
             dtype: str = "float32", progress: bool = False) -> Diagnosis:
    """Per-head importance of the model at model_path over documents from the data paths.

    ``backend`` as ``forward_backend`` resolves it. Gates and sums are accumulated in fp32 / fp64
    whatever ``dtype``.
    """
    from megasink.hf.tokenizer import load_encoder

    model, tok = load_for_forward(model_path, tokenizer, device, backend, dtype)
    if isinstance(model, HFEagerGates):
        n_heads, variant = model.n_heads, model.variant
    else:
        n_heads, variant = model.cfg.n_heads, model.cfg.attention
    if not 0 <= top_m <= n_heads - MIN_ROUTED_HEADS:
        raise ValueError(f"--top-m {top_m} must be in [0, {n_heads - MIN_ROUTED_HEADS}] for {n_heads} heads: "
                         f"fine-tuning needs at least {MIN_ROUTED_HEADS} routed (not shared) heads per layer")
    needs_text = any(_indexed_prefix(str(p)) is None for p in data)
    encode = load_encoder(tok) if (needs_text and tok) else None
    source = DocumentSource(data, encode, text_key)
    samples = iter_samples(source, num_samples, seq_len, shuffle_seed)
    sums, count, n = gate_statistics(model, samples, device, max_batch_tokens, progress,
                                     total=min(num_samples, len(source)))
    if count == 0:
        raise ValueError("no counted tokens: the data has no documents longer than one token")
    return Diagnosis(str(model_path), variant, sums / count, n, count, seq_len, top_m,
                     [str(p) for p in data])


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


def plot_heatmap(d: Diagnosis, path: str | os.PathLike) -> None:
    """layers x heads image of the importance, per-layer CV on the right axis, shared heads boxed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imp = d.importance.numpy()
    L, H = imp.shape
    fig, ax = plt.subplots(figsize=(min(3.5 + 0.4 * H, 24), min(2.5 + 0.3 * L, 24)))
    im = ax.imshow(imp, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1.0, float(imp.max())),
                   interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    ax.tick_params(labelsize=7)
    for layer, heads in enumerate(d.shared_heads()):
        ax.scatter(heads, [layer] * len(heads), marker="s", facecolors="none", edgecolors="red", s=40)
    cv_axis = ax.twinx()  # per-layer CV as right-hand tick labels, aligned with the rows
    cv_axis.set_ylim(ax.get_ylim())
    cv_axis.set_yticks(range(L))
    cv_axis.set_yticklabels([f"{c:.2f}" for c in d.cv.tolist()], fontsize=7)
    cv_axis.set_ylabel("CV of the layer", fontsize=8)
    fig.colorbar(im, ax=[ax, cv_axis], fraction=0.03, pad=0.08, label="importance (token-weighted mean gate)")
    shared = f", red: top-{d.top_m} shared" if d.top_m else ""
    ax.set_title(f"{Path(d.model).name} ({d.variant}): {d.num_samples} samples, {d.num_tokens} tokens{shared}",
                 fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _collapse_word(mean_cv: float) -> str:
    """A rough reading of the mean per-layer CV (thresholds are a rule of thumb, not from the paper)."""
    if mean_cv < 0.25:
        return "balanced: heads carry similar weight"
    if mean_cv < 0.5:
        return "mildly collapsed"
    if mean_cv < 1.0:
        return "collapsed: a few heads dominate most layers"
    return "severely collapsed: most heads are near-idle"


def summary(d: Diagnosis) -> str:
    """One screen of text: how collapsed the model is, layer by layer."""
    imp, cv = d.importance, d.cv
    L, H = imp.shape
    eff = H / (1 + cv.pow(2))  # participation ratio (sum imp)^2 / sum imp^2 = H / (1 + CV^2)
    rel = imp / imp.mean(-1, keepdim=True).clamp_min(1e-12)
    idle = int((rel < 0.1).sum())
    lo, hi = divmod(int(imp.argmin()), H), divmod(int(imp.argmax()), H)
    lines = [
        f"head diagnosis: {d.model} ({d.variant}, {L} layers x {H} heads)",
        f"data: {d.num_samples} samples (<= {d.seq_len} tokens each), {d.num_tokens} counted tokens",
        f"importance: mean {imp.mean():.3f}, min {imp.min():.3f} (layer {lo[0]} head {lo[1]}), "
        f"max {imp.max():.3f} (layer {hi[0]} head {hi[1]})",
        f"CV per layer: mean {cv.mean():.3f}, max {cv.max():.3f} (layer {int(cv.argmax())}), min {cv.min():.3f}",
        f"effective heads per layer (H / (1 + CV^2)): mean {eff.mean():.1f} of {H}",
        f"near-idle heads (< 0.1 x their layer's mean): {idle} of {L * H} ({100 * idle / (L * H):.0f}%)",
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
    p = argparse.ArgumentParser(
        prog="diagnose_heads.py",
        description="Per-head importance (token-weighted mean gate) of a megasink checkpoint or an HF causal-LM "
                    "directory over documents; writes importance.json, importance.png and summary.txt.")
    add_forward_args(p, num_samples=500)
    p.add_argument("--top-m", type=int, default=0, help="also choose the top-m heads per layer as shared heads")
    args = p.parse_args(argv)
    d = diagnose(args.model, args.data, args.num_samples, args.seq_len, args.top_m, args.shuffle_seed,
                 args.tokenizer, args.text_key, args.device, args.backend, args.max_batch_tokens,
                 args.dtype, progress=not args.no_progress)
    out = write_outputs(d, args.out)
    print(summary(d))
    print(f"\nwrote {out / 'importance.json'}, {out / 'importance.png'}, {out / 'summary.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
