"""megasink's own scoring of text: rolling-window log-likelihood and bits per byte.

A document of n tokens (encoded without EOS) is scored as lm-evaluation-harness scores a
``loglikelihood_rolling`` task: the sequence ``[prefix] + tokens`` is cut into windows of at
most ``max_len`` inputs; the first predicts tokens[0:L] from ``[prefix] + tokens[:L-1]``,
each later window predicts the next L tokens (fewer at the end) from the ``max_len`` tokens
before each of them, so every token is predicted once, with as much left context as fits.

    bits/byte = sum over documents of -log p(tokens) / ln 2 / sum of UTF-8 bytes of the texts

This is the reference that the generated BPB task (megasink/eval/tasks.py) is checked
against: the same number from the model's own forward, without the HF export.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch


def rolling_windows(n_tokens: int, max_len: int) -> list[tuple[int, int, int]]:
    """(input start, target start, target end) per window over ``[prefix] + tokens``.

    Indices are into ``[prefix] + tokens``; token j is at index j + 1. A window feeds
    ``seq[input_start:target_end]`` and scores its last ``target_end - target_start`` positions,
    which predict ``seq[target_start + 1:target_end + 1]``.
    """
    if max_len < 1:
        raise ValueError(f"max_len {max_len} must be >= 1")
    windows, start = [], 0
    while start < n_tokens:
        end = min(n_tokens, start + max_len)
        windows.append((max(0, end - max_len), start, end))
        start = end
    return windows


@torch.no_grad()
def rolling_nll(model, documents: list, prefix_token: int, max_len: int, device: str = "cpu",
                batch_size: int = 16) -> list[float]:
    """Negative log-likelihood (nats) of each token list in ``documents``, rolling windows.

    Windows of equal input length are batched (no padding), up to ``batch_size`` per forward.
    """
    groups: dict = {}  # input length -> [(document, input (n,), scored positions)]
    for i, tokens in enumerate(documents):
        seq = torch.tensor([prefix_token] + list(tokens), dtype=torch.long)  # (n + 1,)
        for first, start, end in rolling_windows(len(tokens), max_len):
            groups.setdefault(end - first, []).append((i, seq[first:end + 1], start - first))
    nll = [0.0] * len(documents)
    for length, windows in groups.items():
        for b in range(0, len(windows), batch_size):
            chunk = windows[b:b + batch_size]
            rows = torch.stack([w for _, w, _ in chunk]).to(device)  # (B, length + 1)
            logp = model(rows[:, :-1]).logits.double().log_softmax(-1)  # (B, length, V)
            token_logp = logp.gather(-1, rows[:, 1:, None])[..., 0]  # (B, length)
            for (doc, _, skip), row in zip(chunk, token_logp):
                nll[doc] -= row[skip:].sum().item()
    return nll


def bits_per_byte(model, texts: Iterable[str], encode: Callable[[str], list], prefix_token: int,
                  max_len: int, device: str = "cpu") -> float:
    """Bits per UTF-8 byte of ``texts`` (each encoded by ``encode``, no EOS) under a megasink model."""
    model.eval()
    texts = list(texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    if n_bytes == 0:
        raise ValueError("no text to score")
    return sum(rolling_nll(model, [encode(t) for t in texts], prefix_token, max_len, device)) / math.log(2) / n_bytes
