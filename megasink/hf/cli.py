"""Command lines of tools/convert_to_hf.py and tools/convert_from_hf.py (callable from tests)."""
from __future__ import annotations

import argparse
import sys

from megasink.hf.export import DEFAULT_SHARD_BYTES, DTYPES
from megasink.hf.importer import DEFAULT_GATE_BIAS_INIT, MAX_SINK_WEIGHT


def _size(text: str) -> int:
    units = {"kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    for suffix, mult in (("k", units["kb"]), ("m", units["mb"]), ("g", units["gb"]), ("t", units["tb"])):
        if t.endswith(suffix):
            return int(float(t[:-1]) * mult)
    return int(t)


def to_hf_main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="convert_to_hf.py",
        description="Export a megasink checkpoint (run dir, checkpoints/ dir or step dir) as a Hugging Face "
                    "model directory: vanilla -> its family's class (model.hf_family: Llama, Mistral, Qwen2, "
                    "Qwen3 ForCausalLM); sink/gated -> modeling code in the "
                    "directory (load with trust_remote_code=True).")
    p.add_argument("checkpoint", help="megasink checkpoint: step dir, checkpoints/ dir or run dir")
    p.add_argument("out_dir", help="output directory (written as OUT.tmp and renamed)")
    p.add_argument("--tokenizer", help="sentencepiece .model or Hugging Face tokenizer directory (default: the "
                                       "tokenizer the checkpoint carries, then data.tokenizer of its config)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weight dtype (default float32)")
    p.add_argument("--max-shard-size", type=_size, default=DEFAULT_SHARD_BYTES,
                   help="largest safetensors file, e.g. 5GB (default), 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    from megasink.hf.export import convert_checkpoint

    try:
        out = convert_checkpoint(args.checkpoint, args.out_dir, tokenizer=args.tokenizer, dtype=args.dtype,
                                 max_shard_bytes=args.max_shard_size, overwrite=args.overwrite,
                                 progress=not args.no_progress)
    except (ValueError, OSError) as e:  # config, tokenizer and file problems: the message says what to do
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def logit_change(report) -> str:
    """The measured function change of added sinks / gates, absolute and relative (to what, said)."""
    rel = report.max_logit_change / report.max_logit if report.max_logit else float("nan")
    return (f"largest logit change {report.max_logit_change:.3g} absolute, {rel:.2g} relative to the largest "
            f"|logit| ({report.max_logit:.3g}) of the model without them, on the calibration tokens")


def from_hf_main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="convert_from_hf.py",
        description="Import a Llama / Mistral / Qwen2 / Qwen3-family Hugging Face directory (safetensors), or a "
                    "megasink export, as a megasink checkpoint directory. Checkpoints are layout independent: "
                    "--tp/--pp are recorded in the config.")
    p.add_argument("hf_dir", help="directory with config.json and *.safetensors")
    p.add_argument("out_checkpoint", help="megasink checkpoint directory to write")
    p.add_argument("--attention", choices=["vanilla", "sink", "gated"],
                   help="target variant (default: the source's). vanilla -> sink / gated adds parameters "
                        "initialised to keep the function")
    p.add_argument("--sink-init", type=float, default=None,
                   help="initial sink logit when adding sinks (default: placed per head so that the sink takes "
                        "exactly --max-sink-weight of the head's attention where its log-sum-exp is lowest)")
    p.add_argument("--gate-bias-init", type=float, default=DEFAULT_GATE_BIAS_INIT,
                   help=f"initial gate bias b when adding gates, gate weights 0 and the output projection divided by "
                        f"sigmoid(b), so the function is unchanged (default {DEFAULT_GATE_BIAS_INIT:g}: gates 1/2)")
    p.add_argument("--max-sink-weight", type=float, default=MAX_SINK_WEIGHT,
                   help=f"largest share of any head's attention an added sink may take on the calibration tokens "
                        f"(default {MAX_SINK_WEIGHT:g}); a given --sink-init above it is refused")
    p.add_argument("--tp", type=int, help="parallel.tp recorded in the config")
    p.add_argument("--pp", type=int, help="parallel.pp recorded in the config")
    p.add_argument("--seq-len", type=int, help="model.seq_len (default: max_position_embeddings, at most 4096 and at most a "
                                           "Mistral model's sliding window, beyond which it is refused)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_CHECKPOINT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    from megasink.hf.importer import convert_hf_dir

    try:
        out, report = convert_hf_dir(args.hf_dir, args.out_checkpoint, attention=args.attention,
                                     sink_init=args.sink_init, gate_bias_init=args.gate_bias_init, tp=args.tp,
                                     pp=args.pp, seq_len=args.seq_len, max_sink_weight=args.max_sink_weight,
                                     overwrite=args.overwrite, progress=not args.no_progress)
    except (ValueError, OSError) as e:  # unsupported features, config errors, missing files
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({report.source_variant} -> {report.variant}"
          f"{', exact megasink config from megasink.json' if report.used_sidecar else ''})")
    if report.max_sink_weight is not None:
        print(f"added sinks: largest sink attention weight {report.max_sink_weight:.3g}, {logit_change(report)}")
    if report.min_gate is not None:
        print(f"added gates: smallest gate {report.min_gate:.6g} (output projection scaled to match), "
              f"{logit_change(report)}")
    for note in report.notes:
        print(f"note: {note}")
    return 0
