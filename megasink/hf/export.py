"""megasink checkpoint -> Hugging Face model directory (the library behind tools/convert_to_hf.py).

The directory holds ``config.json``, ``generation_config.json``, safetensors weights (one
file, or shards plus ``model.safetensors.index.json`` above ``max_shard_bytes``), the
tokenizer the model was trained with when one is known (``megasink.hf.tokenizer``), and
``megasink.json`` (the megasink config and shared heads, so that importing the directory
back restores the checkpoint exactly). Vanilla models are their family's stock class
(``model.hf_family``: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` or
``Qwen3ForCausalLM``, mapping.ARCHITECTURES); sink and gated models carry
``configuration_megasink.py`` and ``modeling_megasink.py`` and an ``auto_map`` (load with
``trust_remote_code=True``).

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
from megasink.hf.tokenizer import find_tokenizer, write_export_tokenizer
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


def export_model(model: torch.nn.Module, cfg: Config, out_dir: str | os.PathLike, tokenizer: Optional[str] = None,
                 dtype: str = "float32", max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                 progress: bool = True) -> Path:
    """Write megasink ``model`` (config ``cfg``) as an HF directory at out_dir (atomically renamed), with
    ``tokenizer`` (a sentencepiece .model or a Hugging Face tokenizer directory) when given."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    m = cfg.model
    token_ids = write_export_tokenizer(tokenizer, tmp, m.vocab_size) if tokenizer else {}
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


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def convert_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: Optional[str] = None,
                       dtype: str = "float32", max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                       progress: bool = True) -> Path:
    """tools/convert_to_hf.py: a megasink checkpoint (run, checkpoints or step dir) -> HF directory, carrying
    ``tokenizer`` or else the checkpoint's own tokenizer (``find_tokenizer``)."""
    from megasink import load_checkpoint
    from megasink.checkpoint import resolve_checkpoint_dir

    ckpt = resolve_checkpoint_dir(checkpoint)
    model, cfg = load_checkpoint(ckpt)
    tok = find_tokenizer(ckpt, cfg.data.tokenizer, tokenizer)
    return export_model(model, cfg, out_dir, tokenizer=str(tok) if tok else None, dtype=dtype,
                        max_shard_bytes=max_shard_bytes, overwrite=overwrite, progress=progress)
