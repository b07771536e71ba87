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

A checkpoint of any tp/pp/ZeRO layout (sharded or not) is read one tensor at a time
(``megasink.checkpoint.CheckpointReader``): the export holds one tensor, never the model.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from megasink.config import Config, config_to_dict
from megasink.hf import mapping
from megasink.hf.tokenizer import find_tokenizer, write_export_tokenizer

REMOTE_DIR = Path(__file__).parent / "remote"
REMOTE_FILES = ("configuration_megasink.py", "modeling_megasink.py")
SIDECAR = "megasink.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHARD_BYTES = 5 * 2**30


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    # disable=None: tqdm draws only when stderr is a terminal (no bar lines in Slurm logs or CI)
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=None if enabled else True)


def write_safetensors(pairs, out_dir: Path, dtype: torch.dtype, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      progress: bool = True, shapes: Optional[list] = None) -> list[str]:
    """Write (name, tensor) pairs in ``dtype`` as HF safetensors, sharded with an index above max_shard_bytes.

    Each tensor is converted and written on its own (megasink.safetensors_io). ``pairs`` may be a
    generator that reads each tensor when it is reached (a checkpoint streamed by
    megasink.checkpoint) when ``shapes`` lists each (name, shape) in the same order: memory then
    holds one tensor at a time.
    """
    from megasink.safetensors_io import write_tensors

    if shapes is None:
        pairs = list(pairs)
        shapes = [(name, tuple(t.shape)) for name, t in pairs]
    itemsize = torch.finfo(dtype).bits // 8
    shards: list[list] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(shape)))
        size += nbytes
    total = sum(math.prod(shape) for _, shape in shapes) * itemsize
    single = len(shards) == 1
    names = (["model.safetensors"] if single
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    it = iter(pairs)

    def converted(shard, bar):
        for name, shape in shard:
            got, t = next(it)
            if got != name:
                raise ValueError(f"write_safetensors: tensor {got} arrived where shapes list {name}")
            bar.update(math.prod(shape) * itemsize)
            out = t.detach().to("cpu", dtype)
            del t
            yield out
            del out  # written: dropped before the next tensor is read

    with _progress(total, "writing weights", progress) as bar:
        for fname, shard in zip(names, shards):
            specs = [(name, shape, dtype) for name, shape in shard]
            write_tensors(out_dir / fname, specs, converted(shard, bar), metadata={"format": "pt"})
            weight_map.update({name: fname for name, _ in shard})
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
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return export_tensors(sd, {k: v.to("meta") for k, v in sd.items()}, cfg, out_dir, tokenizer, dtype,
                          max_shard_bytes, overwrite, progress)


def export_tensors(sd, meta: dict, cfg: Config, out_dir: str | os.PathLike, tokenizer: Optional[str] = None,
                   dtype: str = "float32", max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                   progress: bool = True) -> Path:
    """``export_model`` from a megasink state dict ``sd`` (a mapping; a checkpoint's ``LazyTensors``
    is read one tensor at a time as it is written) whose shapes ``meta`` gives as meta tensors."""
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
    shapes = [(name, tuple(t.shape)) for name, t in mapping.to_hf_tensors(meta, m)]
    write_safetensors(mapping.to_hf_tensors(sd, m), tmp, DTYPES[dtype], max_shard_bytes, progress, shapes)
    shared = sd["shared_heads"].cpu() if "shared_heads" in sd else torch.zeros(m.n_layers, m.n_heads, dtype=torch.bool)
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
    from megasink.checkpoint import CheckpointReader, expected_model, resolve_checkpoint_dir
    from megasink.config import load_config

    ckpt = resolve_checkpoint_dir(checkpoint)
    cfg = load_config(ckpt / "config.yaml")
    tok = find_tokenizer(ckpt, cfg.data.tokenizer, tokenizer)
    with CheckpointReader(ckpt) as reader:  # tensor by tensor, whatever layout wrote it
        reader.check_model(expected_model(cfg), cfg.model.tie_embeddings)
        sd = reader.model_tensors()
        return export_tensors(sd, sd.meta(), cfg, out_dir, tokenizer=str(tok) if tok else None, dtype=dtype,
                              max_shard_bytes=max_shard_bytes, overwrite=overwrite, progress=progress)
