"""Typed configuration: dataclasses, strict YAML loading, ``a.b=value`` overrides.

Every field has a type, a default and a one-line docstring (the string literal under it).
Unknown keys and wrong types are errors that name the key and the file. ``validate``
checks cross-field rules (heads divisible by kv heads, ...) before anything distributed
happens.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from megasink.shared_heads import MIN_ROUTED_HEADS, shared_mask_from_file

ATTENTION_VARIANTS = ("vanilla", "sink", "gated")
ATTENTION_BACKENDS = ("auto", "eager", "flash", "varlen", "flex", "sdpa")
LR_SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("fp32", "bf16")
ROPE_SCALINGS = ("none", "linear", "llama3")
HF_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


class ConfigError(ValueError):
    """A configuration problem, reported with the key (and file) it concerns."""


@dataclass
class ModelConfig:
    attention: str = "sink"
    """Attention variant: vanilla | sink | gated (docs/design.md, "The method")."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Number of query heads per layer (global, before tensor parallelism)."""
    n_kv_heads: int = 0
    """Number of key/value heads (grouped-query attention); 0 means n_heads."""
    d_model: int = 128
    """Hidden size."""
    d_head: int = 0
    """Size of each attention head; 0 means d_model / n_heads (Qwen3 and some Mistral models set it)."""
    d_ff: int = 0
    """SwiGLU inner size; 0 means 8/3 * d_model rounded up to ffn_multiple_of."""
    ffn_multiple_of: int = 64
    """Rounding of the automatic SwiGLU inner size."""
    vocab_size: int = 512
    """Vocabulary size (must cover the tokenizer's ids)."""
    seq_len: int = 256
    """Training sequence length in tokens."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: str = "none"
    """RoPE frequency scaling: none | linear (all frequencies / rope_factor) | llama3 (Llama 3.1's)."""
    rope_factor: float = 1.0
    """linear and llama3: the context extension factor (HF rope_parameters "factor")."""
    rope_low_freq_factor: float = 1.0
    """llama3: wavelengths above rope_original_seq_len / this are divided by rope_factor."""
    rope_high_freq_factor: float = 4.0
    """llama3: wavelengths below rope_original_seq_len / this keep their frequency."""
    rope_original_seq_len: int = 8192
    """llama3: the pretraining context length (HF "original_max_position_embeddings")."""
    qkv_bias: bool = False
    """Biases on the q, k and v projections, none on the output projection (Qwen2)."""
    qk_norm: bool = False
    """RMSNorm of every query and key head over head_dim, before RoPE (Qwen3)."""
    sliding_window: int = 0
    """The source model's attention window (Mistral); megasink attends to whole sequences, the same
    function while seq_len <= sliding_window, which is required; 0: no window."""
    hf_family: str = "llama"
    """Hugging Face architecture of a vanilla export (the source's on import): llama | mistral | qwen2 | qwen3."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding and the output projection."""
    attention_backend: str = "auto"
    """Attention route: auto (flash on CPU, varlen on CUDA) | eager | flash | varlen | flex | sdpa
    (inference only); see megasink/model/kernels/."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of weight matrices."""
    sink_init: float = 0.0
    """Initial value of the per-head sink logits (sink attention)."""
    gate_bias_init: float = 0.0
    """Initial bias of the headwise sigmoid gates (gated attention)."""

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        hidden = int(8 * self.d_model / 3)
        m = self.ffn_multiple_of
        return m * ((hidden + m - 1) // m)


@dataclass
class AuxLossConfig:
    coef: float = 1e-4
    """lambda: weight of the CV^2 load-balancing loss; 0 disables it."""
    shared_heads: Union[int, str] = 0
    """Fine-tuning: top-m heads per layer kept out of the CV (a count), or an importance.json path."""
    scale_by_heads: bool = False
    """Multiply each layer's CV^2 by its number of routed heads (the paper's alternative
    normalisation). The default lambdas (1e-4 from scratch, 1e-2 fine-tuning) refer to off."""
    accumulation: str = "global"
    """global: importance over the whole global batch (one no-grad importance pass when
    gradient accumulation > 1); micro: over each micro-batch (global over DP ranks)."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Number of optimizer steps."""
    micro_batch_size: int = 8
    """Sequences per rank per forward pass."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks (sets accumulation)."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr: float = 3e-4
    """Final learning rate of the decay."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    schedule: str = "cosine"
    """Learning-rate schedule: cosine | wsd (warmup-stable-decay) | constant."""
    decay_fraction: float = 0.2
    """wsd: fraction of the steps spent in the final decay."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms, biases, sink logits, gate biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Gradient clipping by global norm; 0 disables it."""
    precision: str = "fp32"
    """fp32 | bf16."""
    log_interval: int = 10
    """Steps between metric lines."""
    importance_interval: int = 50
    """Steps between logging the full importance matrix (and its heatmap)."""
    eval_interval: int = 0
    """Steps between validation runs; 0 disables periodic validation."""
    eval_steps: int = 10
    """Batches per validation run."""
    lm_eval_tasks: str = ""
    """Comma-separated lm-eval tasks run on each eval_interval checkpoint by a background process; empty: none."""
    lm_eval_args: str = ""
    """More ``megasink eval`` arguments for lm_eval_tasks, e.g. "--include-path tasks/x --limit 200"."""
    save_interval: int = 0
    """Steps between checkpoints; 0 saves only at the end."""
    keep_last: int = 3
    """Complete checkpoints kept (older ones are deleted unless a background lm-eval reads them); 0: all."""
    save_checkpoints: bool = True
    """Write checkpoints at all; false only for benchmarks and smoke runs that keep nothing."""
    resume: str = "auto"
    """auto (resume from run_dir's latest if any), none, or a checkpoint directory."""
    seed: int = 1234
    """Seed for initialisation and data order."""
    init_from: str = ""
    """Fine-tuning: start from this checkpoint's weights (fresh optimizer, step 0); empty: random init."""
    max_nan_skips: int = 5
    """Consecutive non-finite losses tolerated (step skipped) before stopping."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass to save memory."""
    compile: bool = False
    """torch.compile each transformer block (one graph per block, no graph breaks); tp = pp = 1 and
    ZeRO 0-2 only."""
    compile_backend: str = "inductor"
    """torch.compile backend for train.compile: inductor (fast kernels) or aot_eager (checks only)."""
    progress: bool = True
    """Show a progress bar on rank 0 (only when stderr is a terminal)."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s per process for MFU; 0 means from the GPU model (CPU: an assumed 0.5)."""


@dataclass
class DataConfig:
    path: list = field(default_factory=lambda: ["synthetic"])
    """Dataset prefixes (``PREFIX`` or ``WEIGHT PREFIX`` entries) or ``synthetic``."""
    valid_path: list = field(default_factory=list)
    """Validation prefixes; empty means PREFIX_valid next to each training prefix when present."""
    tokenizer: str = ""
    """The data's tokenizer: sentencepiece .model or HF tokenizer dir (checked against meta.json, exported)."""
    synthetic_docs: bool = True
    """synthetic data: pack random-length documents (exercises document masking)."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (heads sharded across ranks)."""
    pp: int = 1
    """Pipeline-parallel size (layers split into stages)."""
    dp: int = 0
    """Data-parallel size; 0 means world_size / (tp * pp)."""
    zero_stage: int = -1
    """DeepSpeed ZeRO stage 0-3; -1 (the default) means 1 when parallel.pp > 1, else 0."""
    pp_micro_batches: int = 0
    """Pipeline micro-batches per step; 0 means the gradient accumulation steps."""
    timeout_s: int = 600
    """Collective timeout: a rank that dies makes the others fail after this long."""

    @property
    def zero(self) -> int:
        """The ZeRO stage in effect: zero_stage, or by default 1 with pipeline stages (DeepSpeed's
        pipeline engine clips by the global norm only with ZeRO-1), else 0."""
        return self.zero_stage if self.zero_stage >= 0 else (1 if self.pp > 1 else 0)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture."""
    aux_loss: AuxLossConfig = field(default_factory=AuxLossConfig)
    """Sink-aware auxiliary loss."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and loop."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    run_dir: str = "runs/default"
    """Directory for config.yaml, metrics.jsonl, tensorboard/ and checkpoints/."""


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming key."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: '{key}' = {value!r} matches none of {tp}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is list or origin is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            return [v for v in value.split(",") if v] if "," in value else [value]
    else:
        return value
    raise ConfigError(f"{where}: '{key}' must be {_type_name(tp)}, got {value!r}")


def _from_dict(cls: type, data: dict, prefix: str, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = prefix + str(key)
        if key not in names:
            raise ConfigError(
                f"{where}: unknown key '{full}' (allowed under '{prefix.rstrip('.') or '<root>'}': "
                f"{', '.join(sorted(names))})"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _from_dict(tp, value or {}, full + ".", where)
        else:
            kwargs[key] = _coerce(value, tp, full, where)
    return cls(**kwargs)


def config_from_dict(data: dict, where: str = "<dict>") -> Config:
    return _from_dict(Config, data or {}, "", where)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def apply_override(data: dict, override: str) -> None:
    """Apply one ``a.b=value`` override to the raw dict (value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like key.path=value")
    key, raw = override.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{override}': '{part}' is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides=()) -> Config:
    """Load a YAML config (strict), apply ``a.b=value`` overrides, validate."""
    data: dict = {}
    where = "<defaults>"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: invalid YAML: {e}") from e
    for ov in overrides:
        apply_override(data, ov)
    if overrides:
        where += f" (with overrides {' '.join(overrides)})"
    cfg = config_from_dict(data, where)
    validate(cfg, where)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    from megasink.utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _check_choice(value: str, allowed: tuple, key: str, where: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}: {key} = {value!r} is not one of {', '.join(allowed)}")


def _check_at_least(section, name: str, minimum: int, keys: tuple, where: str) -> None:
    for key in keys:
        value = getattr(section, key)
        if value < minimum:
            raise ConfigError(f"{where}: {name}.{key} must be {'positive' if minimum == 1 else f'>= {minimum}'}, "
                              f"got {value}")


def validate_model(m: ModelConfig, where: str = "<config>") -> None:
    _check_choice(m.attention, ATTENTION_VARIANTS, "model.attention", where)
    _check_choice(m.attention_backend, ATTENTION_BACKENDS, "model.attention_backend", where)
    _check_at_least(m, "model", 1, ("n_layers", "n_heads", "d_model", "vocab_size", "seq_len"), where)
    _check_at_least(m, "model", 0, ("d_head", "sliding_window"), where)
    if m.d_model % m.n_heads and not m.d_head:
        raise ConfigError(f"{where}: model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}: "
                          "set model.d_head (the size of each head) or change one of them")
    if m.head_dim % 2:
        raise ConfigError(f"{where}: head_dim={m.head_dim} (model.d_head, or d_model / n_heads) must be even for RoPE")
    validate_rope_scaling(m, where)
    validate_hf_family(m, where)
    if m.n_heads % m.kv_heads:
        raise ConfigError(
            f"{where}: model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.kv_heads} "
            "(grouped-query attention needs whole groups)"
        )


def validate_rope_scaling(m: ModelConfig, where: str) -> None:
    _check_choice(m.rope_scaling, ROPE_SCALINGS, "model.rope_scaling", where)
    if m.rope_scaling != "none" and not m.rope_factor > 0:
        raise ConfigError(f"{where}: model.rope_factor must be > 0 with model.rope_scaling={m.rope_scaling}, "
                          f"got {m.rope_factor}")
    if m.rope_scaling == "llama3" and not (0 < m.rope_low_freq_factor < m.rope_high_freq_factor
                                           and m.rope_original_seq_len > 0):
        raise ConfigError(f"{where}: model.rope_scaling=llama3 needs 0 < model.rope_low_freq_factor "
                          f"({m.rope_low_freq_factor}) < model.rope_high_freq_factor ({m.rope_high_freq_factor}) "
                          f"and model.rope_original_seq_len > 0 ({m.rope_original_seq_len})")


def validate_hf_family(m: ModelConfig, where: str) -> None:
    """Each Hugging Face family has exactly its own attention features, so a vanilla export is that
    family's stock model: q/k/v biases are Qwen2's, QK-norm Qwen3's, a sliding window Mistral's."""
    _check_choice(m.hf_family, HF_FAMILIES, "model.hf_family", where)
    for key, family in (("qkv_bias", "qwen2"), ("qk_norm", "qwen3")):
        if getattr(m, key) != (m.hf_family == family):
            raise ConfigError(f"{where}: model.{key}={getattr(m, key)} with model.hf_family={m.hf_family}: "
                              f"{key} is the {family} family's feature (and every {family} model has it); "
                              f"set both or neither")
    if m.sliding_window and m.hf_family != "mistral":
        raise ConfigError(f"{where}: model.sliding_window={m.sliding_window} needs model.hf_family=mistral "
                          "(the one family whose sliding window megasink records); set it to 0")
    if m.sliding_window and m.seq_len > m.sliding_window:
        raise ConfigError(
            f"{where}: model.seq_len={m.seq_len} exceeds model.sliding_window={m.sliding_window}: megasink attends "
            "to whole sequences, which is the source model's sliding-window attention only up to the window; "
            f"set model.seq_len (convert_from_hf.py --seq-len) to at most {m.sliding_window}")


def validate_shared_heads(shared_heads: Union[int, str], m: ModelConfig, where: str) -> None:
    """Both forms of aux_loss.shared_heads leave every layer MIN_ROUTED_HEADS routed heads: a count
    here, a file (when it exists; a missing one is named when training reads it) by the same rule in
    megasink.shared_heads.check_routed."""
    if isinstance(shared_heads, int):
        if not 0 <= shared_heads <= m.n_heads - MIN_ROUTED_HEADS:
            raise ConfigError(
                f"{where}: aux_loss.shared_heads={shared_heads} must leave at least {MIN_ROUTED_HEADS} routed "
                f"heads of model.n_heads={m.n_heads}: use 0 to {m.n_heads - MIN_ROUTED_HEADS}")
    elif shared_heads and Path(shared_heads).is_file():
        try:
            shared_mask_from_file(shared_heads, m.n_layers, m.n_heads)
        except ValueError as e:
            raise ConfigError(f"{where}: aux_loss.shared_heads: {e}") from e


def validate(cfg: Config, where: str = "<config>") -> None:
    """Cross-field checks that need no process group (the world size is checked later)."""
    validate_model(cfg.model, where)
    t, p, a = cfg.train, cfg.parallel, cfg.aux_loss
    _check_choice(t.schedule, LR_SCHEDULES, "train.schedule", where)
    _check_choice(t.precision, PRECISIONS, "train.precision", where)
    _check_choice(t.compile_backend, ("inductor", "aot_eager"), "train.compile_backend", where)
    _check_choice(a.accumulation, ("global", "micro"), "aux_loss.accumulation", where)
    if a.coef < 0:
        raise ConfigError(f"{where}: aux_loss.coef must be >= 0, got {a.coef}")
    if not t.lr > 0:
        raise ConfigError(f"{where}: train.lr must be > 0, got {t.lr}")
    if not 0 <= t.min_lr <= t.lr:
        raise ConfigError(f"{where}: train.min_lr must be in [0, train.lr = {t.lr}] (the end of the decay), "
                          f"got {t.min_lr}")
    validate_shared_heads(a.shared_heads, cfg.model, where)
    _check_at_least(t, "train", 1, ("steps", "micro_batch_size", "global_batch_size", "log_interval",
                                    "importance_interval", "eval_steps"), where)
    _check_at_least(t, "train", 0, ("warmup_steps", "eval_interval", "save_interval", "keep_last",
                                    "max_nan_skips"), where)
    if t.lm_eval_tasks and not (t.eval_interval and t.save_checkpoints):
        raise ConfigError(f"{where}: train.lm_eval_tasks evaluates the checkpoint of every train.eval_interval "
                          "step: set train.eval_interval > 0 and keep train.save_checkpoints true")
    if p.zero_stage not in (-1, 0, 1, 2, 3):
        raise ConfigError(f"{where}: parallel.zero_stage must be 0, 1, 2 or 3 (or -1: the default), "
                          f"got {p.zero_stage}")
    for key in ("tp", "pp"):
        if getattr(p, key) < 1:
            raise ConfigError(f"{where}: parallel.{key} must be >= 1")
    if p.pp > 1 and p.zero > 1:
        raise ConfigError(f"{where}: parallel.pp={p.pp} needs parallel.zero_stage 0 or 1 "
                          "(DeepSpeed's pipeline engine does not support ZeRO-2/3)")
    if p.pp > 1 and p.zero == 0 and t.grad_clip > 0:
        raise ConfigError(f"{where}: parallel.pp={p.pp} with parallel.zero_stage=0 clips gradients per stage in "
                          "DeepSpeed, not by the global norm: use parallel.zero_stage=1 (the default with "
                          "parallel.pp > 1) or train.grad_clip=0")
    if t.compile and (p.tp > 1 or p.pp > 1):
        raise ConfigError(f"{where}: train.compile is supported with parallel.tp=1 and parallel.pp=1 only "
                          f"(got tp={p.tp}, pp={p.pp}): the tensor-parallel collectives and DeepSpeed's pipeline "
                          "stages are not traced; set train.compile=false")
    if t.compile and p.zero == 3:
        raise ConfigError(f"{where}: train.compile is supported with parallel.zero_stage 0-2: ZeRO-3 gathers each "
                          "block's parameters in hooks that a compiled block cannot trace, into buffers whose "
                          "alignment changes from layer to layer; use parallel.zero_stage=2 or train.compile=false")
    if p.pp > 1 and a.accumulation != "global":
        raise ConfigError(f"{where}: aux_loss.accumulation={a.accumulation!r} is not supported with parallel.pp > 1")
    m = cfg.model
    if m.n_heads % p.tp:
        raise ConfigError(f"{where}: model.n_heads={m.n_heads} is not divisible by parallel.tp={p.tp}")
    if m.kv_heads % p.tp and p.tp % m.kv_heads:
        raise ConfigError(
            f"{where}: model.n_kv_heads={m.kv_heads} and parallel.tp={p.tp}: one must divide the other"
        )
    if m.n_layers % p.pp:
        raise ConfigError(f"{where}: model.n_layers={m.n_layers} is not divisible by parallel.pp={p.pp}")
