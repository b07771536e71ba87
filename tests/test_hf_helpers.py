"""Helpers (no tests) shared by the HF, diagnosis and evaluation tests: a tiny sentencepiece model, text
encoded with it as an indexed dataset, tiny HF models."""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

SPM_VOCAB = 480
MODEL_VOCAB = 512  # >= SPM_VOCAB: the model may have more rows than the tokenizer has pieces


def stdlib_text() -> str:
    """A few hundred KB of English from standard-library docstrings (no downloads)."""
    import argparse
    import collections
    import json
    import pathlib
    import textwrap

    docs = []
    for mod in (json, pathlib, textwrap, collections, argparse, inspect):
        docs.append(inspect.getdoc(mod) or "")
        for name in dir(mod):
            doc = inspect.getdoc(getattr(mod, name))
            if doc:
                docs.append(doc)
    return "\n".join(docs).encode("ascii", "ignore").decode()


def train_spm(out_dir: Path, vocab_size: int = SPM_VOCAB, model_type: str = "bpe") -> Path:
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.txt"
    corpus.write_text(stdlib_text())
    prefix = out_dir / f"spm_{model_type}"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size, model_type=model_type,
        byte_fallback=model_type == "bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2, num_threads=2,
    )
    return prefix.with_suffix(".model")


def write_tokenized(prefix: Path, texts: list, spm_path: Path) -> str:
    """texts encoded with a sentencepiece model plus EOS (as the preprocessor does) as an indexed dataset."""
    import numpy as np
    import sentencepiece as spm

    from megasink.data.indexed import IndexedDatasetWriter

    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    w = IndexedDatasetWriter(prefix, np.uint16)
    for t in texts:
        w.add_document(np.asarray(sp.encode(t) + [sp.eos_id()]))
    w.finalize()
    w.commit()
    return str(prefix)


def tiny_llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=MODEL_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return LlamaConfig(**base)


def save_random_hf(model_cls, config, out_dir: Path, seed: int = 0, qk_scale: float = 4.0) -> Path:
    """A random HF model saved with safetensors; q/k scaled up so attention is far from uniform."""
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(qk_scale)
    model.save_pretrained(str(out_dir))
    return out_dir


# Small random models of the families people fine-tune (2 layers, GQA 4/2), each with its own feature:
# Llama 3.2 (llama3 RoPE, tied embeddings), Llama with linear RoPE, Qwen2.5 (q/k/v biases, tied), Qwen3
# (QK-norm, head_dim 24 != hidden / heads), Mistral (sliding window 48, so model.seq_len becomes 48).
FAMILY_NAMES = ("llama3", "llama-linear", "qwen2", "qwen3", "mistral")


def family_config(name: str):
    """(transformers model class, config) of one of FAMILY_NAMES."""
    import transformers as tf

    base = dict(vocab_size=MODEL_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                bos_token_id=1, eos_token_id=2)
    if name == "llama3":  # original 32: wavelengths above 32 divided by 8, 8 to 32 smoothed, below 8 kept
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        return tf.LlamaForCausalLM, tf.LlamaConfig(**base, tie_word_embeddings=True, rope_parameters=rope)
    if name == "llama-linear":
        rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
        return tf.LlamaForCausalLM, tf.LlamaConfig(**base, tie_word_embeddings=False, rope_parameters=rope)
    if name == "qwen2":
        return tf.Qwen2ForCausalLM, tf.Qwen2Config(**base, tie_word_embeddings=True)
    if name == "qwen3":
        return tf.Qwen3ForCausalLM, tf.Qwen3Config(**base, head_dim=24, tie_word_embeddings=False)
    if name == "mistral":
        return tf.MistralForCausalLM, tf.MistralConfig(**base, sliding_window=48, tie_word_embeddings=False)
    raise ValueError(f"family {name!r}; allowed: {', '.join(FAMILY_NAMES)}")


def save_family(name: str, out_dir: Path, seed: int = 0) -> Path:
    """A random ``name`` model saved with safetensors: q/k scaled up (attention far from uniform), and
    biases and q/k norm weights random (so a dropped feature changes the logits)."""
    model_cls, config = family_config(name)
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
            elif pname.endswith("_proj.bias"):
                p.normal_(0.0, 0.5)
            elif pname.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(str(out_dir))
    return out_dir
