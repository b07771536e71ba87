"""megasink checkpoint -> Hugging Face model directory (the library behind tools/convert_to_hf.py).

The directory holds ``config.json``, ``generation_config.json``, safetensors weights (one
file, or shards plus ``model.safetensors.index.json`` above ``max_shard_bytes``), the
tokenizer when one is known, and ``megasink.json`` (the megasink config and shared heads,
so that importing the directory back restores the checkpoint exactly). Vanilla models are
stock ``LlamaForCausalLM``; sink and gated models carry ``configuration_megasink.py`` and
``modeling_megasink.py`` and an ``auto_map`` (load with ``trust_remote_code=True``).

Our checkpoints hold full tensors whatever tp/pp/ZeRO layout wrote them, so "gathering" a
layout is ``megasink.load_checkpoint``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from megasink.config import Config, config_to_dict
from megasink.hf import mapping
from megasink.hf.tokenizer import HF_TOKENIZER_SUBDIR, copy_hf_tokenizer, find_spm_model, write_hf_tokenizer
from megasink.utils import set_default_mode

REMOTE_DIR = Path(__file__).parent / "remote"
REMOTE_FILES = ("configuration_megasink.py", "modeling_megasink.py")
SIDECAR = "megasink.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHARD_BYTES = 5 * 2**30


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    # disable=None: tqdm draws only when stderr is a terminal (no bar lines in Slurm logs or CI)
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=None if enabled else True)


def write_safetensors(pairs: list, out_dir: Path, dtype: torch.dtype, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      progress: bool = True) -> list[str]:
    """Write (name, tensor) pairs in ``dtype`` as HF safetensors, sharded with an index above max_shard_bytes.

    Tensors are converted one shard at a time, so memory holds one shard beyond the model.
    """
    from safetensors.torch import save_file

    itemsize = torch.finfo(dtype).bits // 8
    shards: list[list] = [[]]
    size = 0
    for name, t in pairs:
        nbytes = t.numel() * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    total = sum(t.numel() for _, t in pairs) * itemsize
    single = len(shards) == 1
    names = (["model.safetensors"] if single
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    with _progress(total, "writing weights", progress) as bar:
        for fname, shard in zip(names, shards):
            tensors = {}
            for name, t in shard:
                tensors[name] = t.detach().to("cpu", dtype).contiguous().clone()  # no shared storage
                bar.update(t.numel() * itemsize)
            save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
            set_default_mode(out_dir / fname)  # save_file creates owner-only (0600) files
            weight_map.update({k: fname for k in tensors})
            del tensors
    if not single:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def _generation_config(token_ids: dict) -> dict:
    eos, pad = token_ids.get("eos_token_id"), token_ids.get("pad_token_id")
    return {"bos_token_id": token_ids.get("bos_token_id"), "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else eos, "do_sample": False}


def export_model(model: torch.nn.Module, cfg: Config, out_dir: str | os.PathLike, spm_model: Optional[str] = None,
                 hf_tokenizer_dir: Optional[str] = None, dtype: str = "float32",
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False, progress: bool = True) -> Path:
    """Write megasink ``model`` (config ``cfg``) as an HF directory at out_dir (atomically renamed)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    m = cfg.model
    token_ids: dict = {}
    if spm_model:
        token_ids = write_hf_tokenizer(spm_model, tmp, m.vocab_size)
    elif hf_tokenizer_dir:
        copy_hf_tokenizer(hf_tokenizer_dir, tmp)
        token_ids = _token_ids_from_hf_tokenizer(tmp)
    hf_cfg = mapping.hf_config_dict(m, token_ids, dtype=dtype)
    hf_cfg["transformers_version"] = _transformers_version()
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    gen = {**_generation_config(token_ids), "transformers_version": hf_cfg["transformers_version"]}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if m.attention != "vanilla":
        for name in REMOTE_FILES:
            shutil.copyfile(REMOTE_DIR / name, tmp / name)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    write_safetensors(list(mapping.to_hf_tensors(sd, m)), tmp, DTYPES[dtype], max_shard_bytes, progress)
    shared = model.shared_heads.cpu()
    sidecar = {"format": 1, "config": config_to_dict(cfg),
               "shared_heads": [torch.nonzero(row).flatten().tolist() for row in shared]}
    (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _token_ids_from_hf_tokenizer(tok_dir: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=False)
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def convert_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: Optional[str] = None,
                       dtype: str = "float32", max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                       progress: bool = True) -> Path:
    """tools/convert_to_hf.py: a megasink checkpoint (run, checkpoints or step dir) -> HF directory."""
    from megasink import load_checkpoint
    from megasink.checkpoint import resolve_checkpoint_dir

    ckpt = resolve_checkpoint_dir(checkpoint)
    model, cfg = load_checkpoint(ckpt)
    spm_model = find_spm_model(ckpt, cfg.data.tokenizer, tokenizer)
    hf_tok = ckpt / HF_TOKENIZER_SUBDIR
    return export_model(model, cfg, out_dir, spm_model=str(spm_model) if spm_model else None,
                        hf_tokenizer_dir=str(hf_tok) if spm_model is None and hf_tok.is_dir() else None,
                        dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite, progress=progress)
