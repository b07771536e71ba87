"""Hugging Face model directory -> megasink (the library behind tools/convert_from_hf.py).

Reads a Llama / Mistral / Qwen2 / Qwen3-family directory (config.json + safetensors, single
or sharded) or a megasink sink/gated export, checks that megasink's model can represent it
(mapping.check_supported names the missing feature otherwise), and builds a megasink
Transformer with the same weights. A vanilla source can gain sink logits or headwise gates.
They must change the function little *and* be able to train: a sink or gate placed so far out
that it changes nothing also gets no gradient (at s = -30 the sink's is exactly 0 in fp32; at a
gate bias of 15 the slope of the sigmoid is 3e-7, under Adam's eps). So:

- gated: gate weights 0 and gate bias b (default 0: every gate is 1/2, where the sigmoid is
         steepest), with the output projection divided by sigmoid(b): the function is unchanged,
         exactly for b = 0 (mapping.from_hf_tensors).
- sink:  the sink's share of head h's attention is sigmoid(s_h - lse), largest where the
         log-sum-exp is lowest (a document's first tokens). By default (``sink_init=None``) each
         head's sink is placed so that its share is exactly ``max_sink_weight`` (1e-3) at that
         head's lowest lse over calibration tokens (``calibrate_sinks``), and smaller everywhere
         else: each head's output changes by at most 0.1 %, and the sink's gradient is ~1e-3 of
         the attention output's, far above Adam's eps. An explicit ``sink_init`` is used as given
         and refused when its share exceeds ``max_sink_weight`` (the one limit for both).

``check_added_gates`` measures the largest sink share (or smallest gate) and the largest logit
change against the model without the new parameters. Shared-head selection on a converted model
breaks ties by the lower head index (importance.top_m_indices): a gated conversion's gates all
start equal, so measure the base model with tools/diagnose_heads.py and pass its importance.json.

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

DEFAULT_GATE_BIAS_INIT = 0.0  # gates start at 1/2; wo is doubled to keep the function
MAX_SINK_WEIGHT = 1e-3  # the largest share of a head's attention an added sink may take
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
    max_logit_change: Optional[float] = None  # added gates: largest |logit change| vs the model without them
    max_logit: Optional[float] = None  # added gates: largest |logit| of the model without them (same tokens)
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
              disable=None if progress else True) as bar:  # None: only when stderr is a terminal
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
    for key in ("attention", "n_layers", "n_heads", "kv_heads", "d_model", "head_dim", "ffn_dim", "vocab_size",
                "tie_embeddings", "rope_theta", "rope_scaling", "rope_factor", "norm_eps", "qkv_bias", "qk_norm",
                "sliding_window", "hf_family"):
        if getattr(theirs, key) != getattr(cfg.model, key):
            return None  # the directory was changed since export: trust config.json
    return cfg, data.get("shared_heads", [])


def _default_seq_len(m, report: Optional[ImportReport]) -> None:
    """model.seq_len when --seq-len is not given: max_position_embeddings, at most DEFAULT_SEQ_LEN_CAP and
    at most the sliding window (where megasink's whole-sequence attention is the source's)."""
    caps = [(DEFAULT_SEQ_LEN_CAP, "")]
    if m.sliding_window:
        caps.append((m.sliding_window, ", the sliding window"))
    cap, why = min(caps)
    if m.seq_len > cap:
        if report:
            report.notes.append(f"model.seq_len set to {cap}{why} (max_position_embeddings is {m.seq_len}; pass "
                                "--seq-len to choose)")
        m.seq_len = cap


def build_config(hf_dir: str | os.PathLike, hf_cfg: dict, attention: Optional[str] = None,
                 sink_init: Optional[float] = None, gate_bias_init: float = DEFAULT_GATE_BIAS_INIT,
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
            overrides["sink_init"] = 0.0 if sink_init is None else float(sink_init)  # None: calibrated later
        if target == "gated" and src == "vanilla":
            overrides["gate_bias_init"] = float(gate_bias_init)
        model_cfg = mapping.model_config_from_hf(hf_cfg, where, **overrides)
        if seq_len is None:
            _default_seq_len(model_cfg, report)
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
                 sink_init: Optional[float] = None, gate_bias_init: float = DEFAULT_GATE_BIAS_INIT,
                 tp: Optional[int] = None, pp: Optional[int] = None, seq_len: Optional[int] = None,
                 check: bool = True, max_sink_weight: float = MAX_SINK_WEIGHT, progress: bool = True):
    """(model, cfg, report): a megasink Transformer (fp32, CPU) with the HF directory's weights.

    Added sinks: ``sink_init`` None places each head's sink at a share of ``max_sink_weight``
    (``calibrate_sinks``); a number is used as given and refused above that share."""
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
    added = src == "vanilla" and m.attention != "vanilla"
    if added and m.attention == "sink" and sink_init is None:
        sinks = calibrate_sinks(model, max_sink_weight)
        m.sink_init = round(float(sinks.mean()), 4)  # for the record: each head holds its own value
        report.notes.append(f"sinks placed per head (from {sinks.min():.3g} to {sinks.max():.3g}) to take at most "
                            f"{max_sink_weight:g} of any head's attention on the calibration tokens")
    if check and added:
        check_added_gates(model, report)
        if m.attention == "sink" and report.max_sink_weight > max_sink_weight * (1 + 1e-3):  # 1e-3: rounding
            factor = math.log(report.max_sink_weight / (max_sink_weight / 10))
            raise ValueError(
                f"{where}: with sink_init={m.sink_init} the sink takes up to {report.max_sink_weight:.3g} of the "
                f"attention (limit --max-sink-weight {max_sink_weight:g}): some heads have a very low log-sum-exp. "
                f"Leave out --sink-init to place each head's sink at the limit, or use a lower one, e.g. "
                f"{math.floor(m.sink_init - factor)}")
    return model, cfg, report


def _calibration_batch(vocab_size: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, doc_ids), both (1, N): one packed row of up to 512 one-token documents (a first token
    is where the lse is lowest) and two documents of min(seq_len, 64) random tokens."""
    g = torch.Generator().manual_seed(seed)
    firsts = torch.randperm(vocab_size, generator=g)[:512]
    seqs = torch.randint(0, vocab_size, (2, min(seq_len, 64)), generator=g)
    tokens = torch.cat([firsts, seqs.flatten()])[None]  # (1, N)
    doc_ids = torch.cat([torch.arange(len(firsts)), len(firsts) + torch.arange(2).repeat_interleave(seqs.shape[1])])
    return tokens, doc_ids[None]


def _added_params(model) -> list:
    """The tensors a conversion added, one (nh,) per layer: the sinks, or the gate biases (a view of wq's
    bias with q/k/v biases: writing it writes the parameter)."""
    if model.cfg.attention == "sink":
        return [layer.attention.sinks for layer in model.layers.values()]
    return [layer.attention.head_gate_bias() for layer in model.layers.values()]


def _head_min_gates(attention, inputs) -> torch.Tensor:
    """(nh,) each head's smallest gate over one layer's inputs (forward() runs no hooks)."""
    gates = attention.forward(*inputs[:5])[1]  # no token weights: the gates themselves, (B, nh, T)
    return gates.amin(dim=(0, 2)).double().cpu()


@torch.no_grad()
def _each_layer(model, visit) -> None:
    """Run the calibration batch; ``visit(layer index, attention, inputs)`` runs after each layer's
    attention, and whatever it changes in that layer reaches the layers after it."""
    def hook_for(i):
        def hook(attention, inputs, output):
            return output if visit(i, attention, inputs) is None else attention.forward(*inputs)
        return hook

    layers = list(model.layers.values())
    hooks = [layer.attention.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        model(*_calibration_batch(model.cfg.vocab_size, model.cfg.seq_len))
    finally:
        for h in hooks:
            h.remove()


def min_gates(model) -> torch.Tensor:
    """(L, H): each head's smallest gate (sink: 1 - the sink's share) over the calibration tokens."""
    rows = {}
    _each_layer(model, lambda i, attention, inputs: rows.__setitem__(i, _head_min_gates(attention, inputs)))
    return torch.stack([rows[i] for i in range(len(rows))])


def calibrate_sinks(model, weight: float, rounds: int = 8) -> torch.Tensor:
    """Set each head's sink so that it takes ``weight`` of the head's attention at the head's lowest
    log-sum-exp over the calibration tokens (less at every other token); returns the sinks (L, H).

    Layer by layer in one pass, each layer seeing the earlier layers' final sinks. A layer's lowest
    lse is read off its gate sigmoid(lse - s) at a probe s, moved to it round by round (at most 16 a
    round, where the fp32 sigmoid saturates) until the gate there is ~1/2, where lse = s +
    logit(gate) is exact to fp32 rounding.
    """
    sinks = {}

    def place(i, attention, inputs):
        probe = torch.zeros(attention.sinks.shape, dtype=torch.float64)
        for _ in range(rounds):
            attention.sinks.copy_(probe)
            step = torch.logit(_head_min_gates(attention, inputs)).clamp(-16.0, 16.0)  # lse_min - probe
            probe += step
            if step.abs().max() < 1.0:
                break
        sinks[i] = probe + math.log(weight / (1.0 - weight))  # sigmoid(s - lse_min) = weight
        attention.sinks.copy_(sinks[i])
        return True  # recompute this layer's output with its final sinks

    _each_layer(model, place)
    return torch.stack([sinks[i] for i in range(len(sinks))]).float()


@torch.no_grad()
def check_added_gates(model, report: ImportReport) -> None:
    """Measure added sinks/gates: the largest sink share (or smallest gate) and the logit change.

    The reference is the same model without them: sinks at -inf, or gate biases at +inf with the
    output projection multiplied back by each head's starting gate; exactly the vanilla model.
    """
    gated = model.cfg.attention == "gated"
    lowest = float(min_gates(model).min())
    added = _added_params(model)
    wos = [layer.attention.wo.weight for layer in model.layers.values()]
    saved = [p.detach().clone() for p in added] + ([w.detach().clone() for w in wos] if gated else [])
    batch = _calibration_batch(model.cfg.vocab_size, model.cfg.seq_len)
    logits = model(*batch).logits
    try:
        for p, w in zip(added, wos):
            if gated:  # wo (d, nh * hd): each head's columns times its gate at the start
                w.mul_(torch.sigmoid(p).repeat_interleave(w.shape[1] // p.numel())[None, :])
            p.fill_(float("inf") if gated else float("-inf"))
        reference = model(*batch).logits
        report.max_logit_change = (logits - reference).abs().max().item()
        report.max_logit = reference.abs().max().item()
    finally:
        for t, s in zip(added + (wos if gated else []), saved):
            t.copy_(s)
    if gated:
        report.min_gate = lowest
    else:
        report.max_sink_weight = 1.0 - lowest


def convert_hf_dir(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False,
                   **kwargs) -> tuple[Path, ImportReport]:
    """tools/convert_from_hf.py: an HF directory -> a megasink checkpoint directory."""
    from megasink.checkpoint import save_model_checkpoint

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    model, cfg, report = import_model(hf_dir, **kwargs)
    spm = Path(hf_dir) / "tokenizer.model"
    out = save_model_checkpoint(model, cfg, out_dir, tokenizer=str(spm) if spm.is_file() else None)
    if copy_hf_tokenizer(hf_dir, out / HF_TOKENIZER_SUBDIR):
        report.notes.append(f"HF tokenizer files copied to {out / HF_TOKENIZER_SUBDIR}")
    return out, report
