"""Hugging Face model directory -> megasink (the library behind tools/convert_from_hf.py).

Reads a Llama / Mistral / Qwen2 / Qwen3-family directory (config.json + safetensors, single
or sharded) or a megasink sink/gated export, checks that megasink's model can represent it
(mapping.check_supported names the missing feature otherwise), and builds a megasink
Transformer with the same weights. A vanilla source can gain sink logits or headwise gates
initialised so that the model computes the same function at the start:

- sink:  s_h = sink_init (default -30). The sink's softmax weight is sigmoid(s_h - lse), so it
         depends on lse; ``check_added_gates`` measures it on calibration tokens and the
         conversion refuses when it exceeds ``max_sink_weight`` (1e-6), suggesting a lower value.
- gated: gate weights 0 and gate bias b = gate_bias_init (default 15): every gate is
         sigmoid(b) = 1 - 3e-7 for every token. Both values are recorded in the config
         (model.sink_init / model.gate_bias_init).

The target layout (parallel.tp / parallel.pp) is only recorded in the config: megasink
checkpoints hold full tensors and load under any layout.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megasink.config import Config, config_from_dict, validate
from megasink.hf import mapping
from megasink.hf.export import SIDECAR
from megasink.hf.tokenizer import HF_TOKENIZER_SUBDIR, copy_hf_tokenizer

DEFAULT_SINK_INIT = -30.0
DEFAULT_GATE_BIAS_INIT = 15.0
MAX_SINK_WEIGHT = 1e-6
DEFAULT_SEQ_LEN_CAP = 4096


@dataclass
class ImportReport:
    """What an import did, for the CLI to print."""

    source_variant: str
    variant: str
    used_sidecar: bool
    unused_tensors: list = field(default_factory=list)
    max_sink_weight: Optional[float] = None  # sink added: largest sink softmax weight seen
    min_gate: Optional[float] = None  # gates added: smallest gate seen
    max_logit_change: Optional[float] = None  # added gates vs the same model without them
    notes: list = field(default_factory=list)


def is_hf_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "config.json").is_file()


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    cfg = json.loads(path.read_text())
    if "text_config" in cfg and "num_hidden_layers" not in cfg:
        raise mapping.UnsupportedModelError(f"{path}: a multimodal config (text_config); convert a causal LM")
    return cfg


def weight_files(hf_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of an HF directory (single file or the shards named by the index)."""
    d = Path(hf_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [d / n for n in names]
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    if any(d.glob("*.bin")) or any(d.glob("*.pt")):
        raise mapping.UnsupportedModelError(
            f"{d}: only pickle weights (*.bin); convert them to safetensors first "
            "(e.g. load in transformers and save_pretrained(..., safe_serialization=True))")
    raise FileNotFoundError(f"{d}: no model.safetensors or model.safetensors.index.json")


def tensor_names(hf_dir: str | os.PathLike) -> list[str]:
    from safetensors import safe_open

    names = []
    for f in weight_files(hf_dir):
        with safe_open(str(f), framework="pt") as st:
            names.extend(st.keys())
    return names


def read_tensors(hf_dir: str | os.PathLike, progress: bool = True) -> dict:
    """All tensors of an HF directory, as stored (dtype unchanged)."""
    from safetensors import safe_open
    from tqdm import tqdm

    files = weight_files(hf_dir)
    out = {}
    with tqdm(total=sum(f.stat().st_size for f in files), desc="reading weights", unit="B", unit_scale=True,
              disable=not progress) as bar:
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    t = st.get_tensor(name)
                    out[name] = t
                    bar.update(t.numel() * t.element_size())
    return out


def _sidecar_config(hf_dir: Path, hf_cfg: dict) -> Optional[tuple[Config, list]]:
    """The exact megasink Config of a megasink export, if present and consistent with config.json."""
    path = hf_dir / SIDECAR
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    cfg = config_from_dict(data["config"], str(path))
    theirs = mapping.model_config_from_hf(hf_cfg)
    for key in ("attention", "n_layers", "n_heads", "kv_heads", "d_model", "ffn_dim", "vocab_size",
                "tie_embeddings", "rope_theta", "norm_eps"):
        if getattr(theirs, key) != getattr(cfg.model, key):
            return None  # the directory was changed since export: trust config.json
    return cfg, data.get("shared_heads", [])


def build_config(hf_dir: str | os.PathLike, hf_cfg: dict, attention: Optional[str] = None,
                 sink_init: float = DEFAULT_SINK_INIT, gate_bias_init: float = DEFAULT_GATE_BIAS_INIT,
                 tp: Optional[int] = None, pp: Optional[int] = None, seq_len: Optional[int] = None,
                 report: Optional[ImportReport] = None) -> tuple[Config, list]:
    """The megasink Config for an HF model (and shared heads from a megasink export's sidecar)."""
    where = str(Path(hf_dir) / "config.json")
    src = mapping.source_variant(hf_cfg)
    target = attention or src
    side = _sidecar_config(Path(hf_dir), hf_cfg) if target == src else None
    if side is not None:
        cfg, shared = side
        if report:
            report.used_sidecar = True
    else:
        shared = []
        overrides = {"attention": target}
        if target == "sink" and src == "vanilla":
            overrides["sink_init"] = float(sink_init)
        if target == "gated" and src == "vanilla":
            overrides["gate_bias_init"] = float(gate_bias_init)
        model_cfg = mapping.model_config_from_hf(hf_cfg, where, **overrides)
        if seq_len is None and model_cfg.seq_len > DEFAULT_SEQ_LEN_CAP:
            if report:
                report.notes.append(f"model.seq_len set to {DEFAULT_SEQ_LEN_CAP} (max_position_embeddings is "
                                    f"{model_cfg.seq_len}; pass --seq-len to choose)")
            model_cfg.seq_len = DEFAULT_SEQ_LEN_CAP
        cfg = Config(model=model_cfg)
    if seq_len is not None:
        cfg.model.seq_len = seq_len
    if tp is not None:
        cfg.parallel.tp = tp
    if pp is not None:
        cfg.parallel.pp = pp
        if pp > 1 and cfg.parallel.zero_stage == 0:
            cfg.parallel.zero_stage = 1  # the pipeline engine clips by the global norm only with ZeRO-1
    validate(cfg, where)
    return cfg, shared


def import_model(hf_dir: str | os.PathLike, attention: Optional[str] = None,
                 sink_init: float = DEFAULT_SINK_INIT, gate_bias_init: float = DEFAULT_GATE_BIAS_INIT,
                 tp: Optional[int] = None, pp: Optional[int] = None, seq_len: Optional[int] = None,
                 check: bool = True, max_sink_weight: float = MAX_SINK_WEIGHT, progress: bool = True):
    """(model, cfg, report): a megasink Transformer (fp32, CPU) with the HF directory's weights."""
    from megasink.model.transformer import Transformer

    hf_dir = Path(hf_dir)
    hf_cfg = read_hf_config(hf_dir)
    where = str(hf_dir)
    names = tensor_names(hf_dir)
    mapping.check_supported(hf_cfg, where, names)
    src = mapping.source_variant(hf_cfg)
    if attention not in (None, "vanilla", "sink", "gated"):
        raise ValueError(f"attention={attention!r}; allowed: vanilla, sink, gated")
    report = ImportReport(source_variant=src, variant=attention or src, used_sidecar=False)
    cfg, shared = build_config(hf_dir, hf_cfg, attention, sink_init, gate_bias_init, tp, pp, seq_len, report)
    m = cfg.model
    report.unused_tensors = mapping.unused_hf_tensors(names, m, src)
    if report.unused_tensors:
        raise mapping.UnsupportedModelError(
            f"{where}: tensors megasink's model has no place for: {', '.join(report.unused_tensors[:8])}"
            + (" ..." if len(report.unused_tensors) > 8 else ""))
    sd = mapping.from_hf_tensors(read_tensors(hf_dir, progress), m, src, where)
    model = Transformer(m, cfg.aux_loss)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    allowed = {"shared_heads"} | ({"output.weight"} if m.tie_embeddings else set())
    if set(missing) - allowed or unexpected:
        raise RuntimeError(f"{where}: weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    del sd
    for layer, heads in enumerate(shared):
        model.shared_heads[layer, list(heads)] = True
    if check and src == "vanilla" and m.attention != "vanilla":
        check_added_gates(model, report)
        if m.attention == "sink" and report.max_sink_weight > max_sink_weight:
            factor = math.log(report.max_sink_weight / (max_sink_weight / 10))
            raise ValueError(
                f"{where}: with sink_init={m.sink_init} the sink takes up to {report.max_sink_weight:.3g} of the "
                f"attention (limit {max_sink_weight:g}): some heads have a very low log-sum-exp. "
                f"Use a lower --sink-init, e.g. {math.floor(m.sink_init - factor)}")
    return model, cfg, report


def _calibration_tokens(vocab_size: int, seq_len: int, seed: int = 0) -> list[torch.Tensor]:
    """Token batches for checking added gates: many first tokens (where lse is lowest) and a few sequences."""
    g = torch.Generator().manual_seed(seed)
    firsts = torch.randperm(vocab_size, generator=g)[:512][:, None]  # (<=512, 1): position 0 only
    seqs = torch.randint(0, vocab_size, (2, min(seq_len, 64)), generator=g)
    return [firsts, seqs]


@torch.no_grad()
def check_added_gates(model, report: ImportReport) -> None:
    """Measure added sinks/gates: max sink weight (or min gate) and the logit change they cause.

    The reference is the same model with the sinks at -inf (or the gate bias at +inf), which is
    exactly the vanilla model.
    """
    variant = model.cfg.attention
    gates_min, inside = [], []

    def per_token_gates(mod, inp, out):  # the model asks for gate sums: run the layer again for the gates
        if not inside:
            inside.append(True)
            try:
                gates_min.append(mod(*inp[:5])[1].min().item())  # no token weights: (B, nh, T) gates
            finally:
                inside.clear()

    hooks = [layer.attention.register_forward_hook(per_token_gates) for layer in model.layers.values()]
    param = "sinks" if variant == "sink" else "gate_bias"
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(param)}
    max_change = 0.0
    try:
        for tokens in _calibration_tokens(model.cfg.vocab_size, model.cfg.seq_len):
            logits = model(tokens).logits
            for n, p in model.named_parameters():
                if n.endswith(param):
                    p.fill_(float("-inf") if variant == "sink" else float("inf"))
            ref = model(tokens).logits
            for n, p in model.named_parameters():
                if n.endswith(param):
                    p.copy_(saved[n])
            max_change = max(max_change, (logits - ref).abs().max().item())
    finally:
        for h in hooks:
            h.remove()
        for n, p in model.named_parameters():
            if n in saved:
                p.data.copy_(saved[n])
    # gates_min holds entries from both the real and the reference passes; the reference gates are 1
    lowest = min(gates_min)
    report.max_logit_change = max_change
    if variant == "sink":
        report.max_sink_weight = 1.0 - lowest
    else:
        report.min_gate = lowest


def convert_hf_dir(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False,
                   **kwargs) -> tuple[Path, ImportReport]:
    """tools/convert_from_hf.py: an HF directory -> a megasink checkpoint directory."""
    from megasink.train.checkpoint import save_model_checkpoint

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    model, cfg, report = import_model(hf_dir, **kwargs)
    spm = Path(hf_dir) / "tokenizer.model"
    out = save_model_checkpoint(model, cfg, out_dir, tokenizer=str(spm) if spm.is_file() else None)
    if copy_hf_tokenizer(hf_dir, out / HF_TOKENIZER_SUBDIR):
        report.notes.append(f"HF tokenizer files copied to {out / HF_TOKENIZER_SUBDIR}")
    return out, report
