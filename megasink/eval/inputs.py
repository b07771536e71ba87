"""What head diagnosis and head ablation read: the model, the length it was trained at, the
documents, and the command-line options the two share (the same --data, --num-samples,
--seq-len and --shuffle-seed give the same samples).

The model is a megasink checkpoint, or a Hugging Face causal-LM directory converted in memory
to megasink. An HF model megasink cannot represent (e.g. Qwen3's QK-norm) is read by
transformers itself with eager attention (``HFEagerGates``): its vanilla gates come from the
attention probabilities, so, unlike megasink's kernels, which give the gates from their
log-sum-exp, that fallback forms each layer's (B, H, T, T) attention matrix in turn, and
``--backend`` does not apply to it.

Backend and dtype. ``--backend auto`` means what it means everywhere,
``megasink.model.kernels.resolve_backend``: the CPU flash kernel on the CPU, FlashAttention-2
(varlen) on CUDA. varlen runs half types only, so ``--dtype auto`` is bfloat16 on CUDA and
float32 elsewhere; float32 on CUDA takes a route that runs it (``--backend sdpa``, ``eager`` or
``flex``). A backend other than the checkpoint's own is applied by building the model from its
config with that backend and loading its weights into it (nothing is set on a built model), at
the cost of a second copy of the weights while loading.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megasink.config import ATTENTION_BACKENDS

DTYPES = ("auto", "float32", "bfloat16", "float16")
HF_DEFAULT_LENGTH = 2048  # an HF config without max_position_embeddings (megasink's importer assumes the same)


# --------------------------------------------------------------------------- the model


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

    def to(self, *args):
        self.hf.to(*args)
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
        return torch.stack(sums), tokens.shape[0] * (tokens.shape[1] - 1)  # (L, H), count


def _is_hf_dir(path) -> bool:
    from megasink.hf.importer import is_hf_dir

    return is_hf_dir(path)


def model_tokenizer(path: str | os.PathLike, tokenizer: Optional[str] = None) -> Optional[str]:
    """``tokenizer`` if given, else the model's own: an HF directory's tokenizer files, or what
    a checkpoint carries (megasink.hf.tokenizer.find_tokenizer, the one rule); None if there is none."""
    from megasink.hf.tokenizer import find_tokenizer

    if _is_hf_dir(path):
        found = find_tokenizer(Path(path), "", tokenizer)
        return str(found) if found else None
    from megasink.checkpoint import resolve_checkpoint_dir
    from megasink.config import load_config

    ckpt = resolve_checkpoint_dir(path)
    found = find_tokenizer(ckpt, load_config(ckpt / "config.yaml").data.tokenizer, tokenizer)
    return str(found) if found else None


def trained_length(path: str | os.PathLike) -> tuple[int, str]:
    """(the longest window the model was trained for, where that number comes from): a
    checkpoint's model.seq_len, an HF directory's max_position_embeddings."""
    if _is_hf_dir(path):
        hf_cfg = json.loads((Path(path) / "config.json").read_text())
        n = hf_cfg.get("max_position_embeddings") or hf_cfg.get("text_config", {}).get("max_position_embeddings")
        if n:
            return int(n), f"max_position_embeddings of {Path(path) / 'config.json'}"
        return HF_DEFAULT_LENGTH, f"no max_position_embeddings in {Path(path) / 'config.json'}: assumed"
    from megasink.checkpoint import resolve_checkpoint_dir
    from megasink.config import load_config

    ckpt = resolve_checkpoint_dir(path)
    return load_config(ckpt / "config.yaml").model.seq_len, f"model.seq_len of {ckpt / 'config.yaml'}"


def default_seq_len(path: str | os.PathLike) -> int:
    """Diagnosis' window when --seq-len is not given: the model's trained length; for an HF
    directory capped as convert_from_hf.py caps it (a 128k-position model is not diagnosed at 128k,
    a sliding-window model not beyond its window, which megasink's model refuses)."""
    from megasink.hf.importer import DEFAULT_SEQ_LEN_CAP

    n, _ = trained_length(path)
    if not _is_hf_dir(path):
        return n
    window = json.loads((Path(path) / "config.json").read_text()).get("sliding_window") or n
    return min(n, DEFAULT_SEQ_LEN_CAP, int(window))


def load_model(path: str | os.PathLike):
    """(model, its megasink Config or None) from a megasink checkpoint or an HF directory; the
    model is a megasink Transformer, or an ``HFEagerGates`` (Config None) for an HF causal LM
    megasink cannot represent."""
    if _is_hf_dir(path):
        from megasink.hf.importer import import_model
        from megasink.hf.mapping import UnsupportedModelError

        try:
            model, cfg, _ = import_model(path, check=False, progress=False)
        except UnsupportedModelError as e:
            print(f"note: {e}\nnote: falling back to transformers' eager attention (vanilla gates)",
                  file=sys.stderr)
            return HFEagerGates.from_pretrained(path), None
        return model, cfg
    from megasink import load_checkpoint

    return load_checkpoint(path)


def forward_dtype(dtype: str, device: str | torch.device) -> str:
    """``auto``: bfloat16 on CUDA (what varlen, the CUDA ``auto`` route, runs), float32 elsewhere."""
    if dtype == "auto":
        return "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return dtype


def check_route(backend: str, device: str | torch.device, dtype: str) -> str:
    """The route ``backend`` takes on ``device`` for a forward pass (resolve_backend, no lse
    gradient); refuses float32 on varlen by name, before any weight is loaded."""
    from megasink.model.kernels import BackendError, resolve_backend

    try:
        route = resolve_backend(backend, torch.device(device), needs_lse_grad=False)
    except BackendError as e:
        raise ValueError(f"--backend {backend} on {device}: {e}") from None
    if route == "varlen" and dtype == "float32":
        raise ValueError(f"--backend {backend} on {device} is FlashAttention-2 (varlen), which runs bfloat16 and "
                         "float16 only: leave --dtype at auto (bfloat16), or keep float32 with --backend sdpa")
    return route


def load_for_forward(path: str | os.PathLike, device: str, backend: str = "auto", dtype: str = "auto"):
    """``load_model``, then the model on ``device`` in ``dtype`` (one of ``DTYPES``) with attention
    backend ``backend`` (see the module docstring; ``HFEagerGates`` keeps eager attention)."""
    import megasink

    dtype = forward_dtype(dtype, device)
    check_route(backend, device, dtype)
    model, cfg = load_model(path)
    if cfg is None:
        if backend != "auto":
            print(f"note: --backend {backend} does not apply: transformers' eager attention gives the gates",
                  file=sys.stderr)
    else:
        if backend != cfg.model.attention_backend:  # build with the backend asked for, then load the weights
            rebuilt = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention_backend=backend),
                                          aux_loss=dataclasses.replace(cfg.aux_loss, shared_heads=0))
            fresh = megasink.build_model(rebuilt)
            fresh.load_state_dict(model.state_dict())  # shared_heads too (a buffer)
            model = fresh
        model.eval()
    model.to(device)
    if dtype != "float32":
        model.to(getattr(torch, dtype))
    return model


# --------------------------------------------------------------------------- the documents


def read_samples(data: list, num_samples: int, seq_len: int, shuffle_seed: Optional[int] = None,
                 tokenizer: Optional[str] = None, text_key: str = "text") -> list[np.ndarray]:
    """Up to ``num_samples`` non-empty documents of ``data`` truncated to ``seq_len`` tokens, text
    encoded with ``tokenizer`` (megasink/data/documents.py)."""
    from megasink.data.documents import DocumentSource, iter_samples
    from megasink.hf.tokenizer import load_encoder

    source = DocumentSource(data, text_key)
    encode = load_encoder(tokenizer) if (source.has_text and tokenizer) else None
    return list(iter_samples(source, num_samples, seq_len, shuffle_seed, encode))


def sample_notes(samples: list, num_asked: int, seq_len: int, trained: tuple[int, str]) -> list[str]:
    """What the user should know about the samples: fewer than asked for, or windows longer than
    the model was trained for (gates there measure the model outside its training range)."""
    notes = []
    if len(samples) < num_asked:
        notes.append(f"note: found {len(samples)} of the {num_asked} samples asked for (--num-samples): the data "
                     "has no more non-empty documents")
    length, where = trained
    longer = sum(len(s) > length for s in samples)
    if longer:
        notes.append(f"warning: {longer} of {len(samples)} samples are longer than the {length} tokens the model was "
                     f"trained for ({where}); --seq-len {seq_len} measures it outside its training range "
                     f"(leave --seq-len out to use {length})")
    return notes


# --------------------------------------------------------------------------- command line


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help; where the default is None or False (an off switch, or
    a default that depends on the model) the help text says it in words."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def add_forward_args(p: argparse.ArgumentParser, num_samples: int) -> None:
    """The options diagnosis and ablation share: the model, the documents, the output folder
    and how the forward passes run."""
    p.add_argument("model", help="megasink checkpoint (run / checkpoints / step dir) or HF model directory")
    p.add_argument("--data", nargs="+", required=True,
                   help="indexed dataset prefixes (PREFIX.bin/.idx, or its shards PREFIX_00000...) or text inputs "
                        "(.parquet, .jsonl[.gz|.zst], folders of them)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-samples", type=int, default=num_samples, help="documents to use")
    p.add_argument("--seq-len", type=int,
                   help="truncate each document to this many tokens (default: the length the model was trained "
                        "for: model.seq_len of a checkpoint; max_position_embeddings of an HF directory, at most "
                        "4096)")
    p.add_argument("--shuffle-seed", type=int, help="sample documents in a seeded random order (default: in order)")
    p.add_argument("--tokenizer", help="sentencepiece .model or HF tokenizer dir (default: the model's own)")
    p.add_argument("--text-key", default="text", help="JSON / parquet field with the text")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--backend", default="auto", choices=ATTENTION_BACKENDS,
                   help="attention kernel; auto: flash on the CPU, varlen (FlashAttention-2) on CUDA, as in training")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="model weights dtype; auto: bfloat16 on CUDA (varlen's types), float32 elsewhere")
    p.add_argument("--max-batch-tokens", type=int, default=16384,
                   help="tokens per forward pass (ablation's logits take max-batch-tokens x vocabulary floats; "
                        "diagnosis computes none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (there is none off a terminal)")
