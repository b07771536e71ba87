"""``megasink train CONFIG.yaml [a.b=value ...]``: set up the layout, model, data and run.

Runs as one process, or under torchrun / srun / the deepspeed launcher. Everything that
can be checked without a process group (config keys and types, layout against the world
size, data paths) is checked first, so a bad launch fails by name before any collective.
"""
from __future__ import annotations

import argparse
import gc
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megasink.config import Config, ConfigError, load_config
from megasink.errors import UserError, report_user_error

EPILOG = """examples:
  megasink train configs/tiny-sink.yaml
  megasink train configs/tiny-sink.yaml train.steps=50 aux_loss.coef=0 run_dir=runs/noaux
  torchrun --nproc_per_node 2 -m megasink.train configs/tiny-sink.yaml parallel.zero_stage=1
"""


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="megasink train", description="Train a sink-aware decoder-only LM (DeepSpeed; CPU/gloo or GPU/NCCL).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML config (see configs/); unknown keys are errors")
    ap.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.steps=100 parallel.tp=2")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return ap.parse_args(argv)


def check_data(cfg: Config, where: str = "<config>") -> None:
    """Fail early, by name, on data and tokenizer paths that do not exist (synthetic data reads
    no tokenizer: a config's data.tokenizer is not needed for a synthetic smoke run)."""
    from megasink.data import parse_data_paths, resolve_prefix

    prefixes = [prefix for _, prefix in parse_data_paths(cfg.data.path, "data.path") if prefix != "synthetic"]
    for prefix in prefixes:
        resolve_prefix(prefix, "data.path")  # raises, naming the missing prefix
    if prefixes and cfg.data.tokenizer and not Path(cfg.data.tokenizer).exists():
        raise ConfigError(f"{where}: data.tokenizer={cfg.data.tokenizer} does not exist: the tokenizer the data was "
                          "built with (recorded in checkpoints and exports); fix the path or leave it empty")


def _rank0_print(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, file=sys.stderr, flush=True)


def setup_shared_heads(model, cfg: Config, dims, train_ds) -> None:
    """Fine-tuning: mark the shared heads (excluded from the CV) before training starts."""
    from megasink.data import to_device
    from megasink.model import importance as imp_lib
    from megasink.shared_heads import shared_mask_from_file

    m = cfg.aux_loss.shared_heads
    if isinstance(m, str) and m:
        model.shared_heads.copy_(shared_mask_from_file(m, cfg.model.n_layers, cfg.model.n_heads))
    elif isinstance(m, int) and m > 0:
        from megasink.data import build_loader

        loader = build_loader(train_ds, cfg.train.micro_batch_size, dims.dp_rank, dims.dp, cfg.train.seed)
        with torch.no_grad():
            b = to_device(loader.next_batch(), dims.device)
            out = model(b["tokens"], b["doc_ids"])
        sums, count = out.gate_sums.clone(), out.gate_count.clone().reshape(1)
        if dims.dp > 1:
            dist.all_reduce(sums, group=dims.group("dp"))
            dist.all_reduce(count, group=dims.group("dp"))
        imp = imp_lib.importance(sums, count[0])
        model.shared_heads.copy_(imp_lib.top_m_shared(imp, m))
        tied = imp_lib.tied_layers(imp, m)
        if tied:
            _rank0_print(f"[megasink] warning: layers {tied}: heads tie for the top-{m}; the lower head index was "
                         "taken (a converted model's new gates start equal: measure the base model with "
                         "tools/diagnose_heads.py --top-m and pass its importance.json as aux_loss.shared_heads)")
    if model.shared_heads.any():
        _rank0_print(f"[megasink] shared heads per layer: {[row.nonzero().flatten().tolist() for row in model.shared_heads]}")


def load_initial_weights(model, cfg: Config) -> None:
    """Fine-tuning: copy a checkpoint's weights into the freshly built model (same architecture),
    one tensor at a time; its shared heads are not taken (fine-tuning measures or reads its own)."""
    from megasink.checkpoint import CheckpointError, read_model_into, resolve_checkpoint_dir

    ckpt = resolve_checkpoint_dir(cfg.train.init_from)
    try:
        read_model_into(model, ckpt, ignore=("shared_heads",))
    except CheckpointError as e:
        raise CheckpointError(f"train.init_from={ckpt}: does not match the model config ({e}); the model section "
                              "must be the checkpoint's") from e
    _rank0_print(f"[megasink] initial weights from {ckpt}")


def build_everything(cfg: Config, dims, resume_dir=None):
    from megasink.data import build_dataset, build_loader
    from megasink.model.transformer import Transformer
    from megasink.parallel.parallelize import parallelize
    from megasink.train.pipeline_trainer import PipelineTrainer
    from megasink.train.trainer import Trainer

    torch.manual_seed(cfg.train.seed)
    # same weights on every rank: sliced by parallelize
    model = Transformer(cfg.model, cfg.aux_loss, activation_checkpointing=cfg.train.activation_checkpointing)
    model.to(dims.device)
    m = cfg.model
    train_ds = build_dataset(cfg.data, m.seq_len, m.vocab_size, cfg.train.seed, split="train")
    if resume_dir is None:
        if cfg.train.init_from:
            load_initial_weights(model, cfg)
        setup_shared_heads(model, cfg, dims, train_ds)
    pm = parallelize(model, cfg, dims)
    loader = build_loader(train_ds, cfg.train.micro_batch_size, dims.dp_rank, dims.dp, cfg.train.seed)
    trainer_class = PipelineTrainer if pm.is_pipeline else Trainer
    return trainer_class(cfg, dims, pm, loader, _validation_set(cfg), evals=_background_evals(cfg, dims))


def _background_evals(cfg: Config, dims):
    """Rank 0's maker of background ``megasink eval`` runs of the eval_interval checkpoints
    (train.lm_eval_tasks): called by the trainer with its log function; None elsewhere."""
    if not cfg.train.lm_eval_tasks or dims.rank != 0:
        return None
    from megasink.eval.background import BackgroundEvals

    return lambda log: BackgroundEvals(Path(cfg.run_dir), cfg.train.lm_eval_tasks, cfg.train.lm_eval_args, log)


def _validation_set(cfg: Config):
    from megasink.data import build_dataset

    m = cfg.model
    valid_ds = None
    if cfg.train.eval_interval or cfg.data.valid_path or cfg.data.path != ["synthetic"]:
        try:
            valid_ds = build_dataset(cfg.data, m.seq_len, m.vocab_size, cfg.train.seed, split="valid")
        except FileNotFoundError as e:
            _rank0_print(f"[megasink] no validation split: {e}")
    return valid_ds


def run(cfg: Config, where: str = "<config>") -> dict:
    """Train under the current launch environment; tears the process group down at the end."""
    from megasink.parallel.dims import init_distributed, teardown_distributed
    from megasink.train.state import find_resume_dir

    check_data(cfg, where)
    run_dir = Path(cfg.run_dir)
    created = not run_dir.exists()  # on every rank before any creates it (init is a rendezvous)
    dims = init_distributed(cfg, where)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        resume_dir = find_resume_dir(cfg)  # collective: the same answer on every rank
        return _train(cfg, dims, resume_dir)
    except BaseException:
        if created and dims.rank == 0:
            _remove_if_unused(run_dir)
        raise
    finally:
        teardown_distributed()


def _train(cfg: Config, dims, resume_dir) -> dict:
    trainer = build_everything(cfg, dims, resume_dir)
    try:
        return trainer.run(resume_dir)
    finally:
        # DeepSpeed's engines hold reference cycles: free them (and their use of the process groups)
        # before the groups are destroyed; otherwise a rank can abort at exit after all its work
        del trainer
        gc.collect()


def _remove_if_unused(run_dir: Path) -> None:
    """A run directory this command created and that holds no step (no metrics record, no
    checkpoint) is removed when the run fails: a failed start leaves nothing behind."""
    metrics = run_dir / "metrics.jsonl"
    if any((run_dir / "checkpoints").glob("step_*")) or (metrics.exists() and metrics.stat().st_size > 0):
        return
    shutil.rmtree(run_dir, ignore_errors=True)


def main(argv=None) -> int:
    """Exit 0 when training ends or stops on a signal (run_dir/PREEMPTED), 2 on a user error
    (one line on stderr, from rank 0 only); a bug keeps its traceback."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        run(cfg, args.config)
    except ConfigError as e:
        return report_user_error("megasink: config error", e)
    except (UserError, FileNotFoundError) as e:
        return report_user_error("megasink", e)
    except KeyboardInterrupt:  # before the training loop (which turns Ctrl-C into a checkpoint)
        print("[megasink] interrupted before training started: nothing was saved", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
