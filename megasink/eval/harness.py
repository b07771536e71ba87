"""``megasink eval``: downstream evaluation with EleutherAI's lm-evaluation-harness.

A megasink checkpoint (run, checkpoints/ or step directory; any training layout) is exported
to a temporary Hugging Face directory (megasink/hf/export.py: vanilla as its family's stock class,
sink / gated with their modeling code, loaded with ``trust_remote_code``) and evaluated there
with lm-eval's ``HFLM``, so every lm-eval task type works, generation included. An HF model
directory is evaluated as it is.

Documents in megasink's data end with EOS and start with BOS only when the tokenizer's own
encode adds one (Llama 3): lm-eval's prefix token (what a rolling window or an empty context
conditions on) is that BOS, or else the EOS after which a text starts in training. Outputs in ``--out``: ``results.json`` (lm-eval's results plus a ``megasink``
block) and ``results.md`` (lm-eval's markdown table, also printed).

Offline, tasks come from local YAMLs (``dataset_path: json`` with absolute ``data_files``, as
tools/make_eval_task.py writes) with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 set.

Progress: on a terminal, lm-eval's own bars. Elsewhere (a log file, such as the background
evaluations' eval.log) there are no bars (lm-eval draws one per batch of rolling windows, so
one per document): lm-eval's progress becomes one whole line at most every ``LOG_INTERVAL_S``
seconds, and transformers' and datasets' bars are off (``log_progress``).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

LM_EVAL_HINT = "pip install 'lm-eval[hf]==0.4.13' (make installs it)"
LOG_INTERVAL_S = 30.0  # off a terminal: at most one progress line per this many seconds


@dataclass
class HFModel:
    """An HF directory ready for lm-eval."""

    path: Path
    remote_code: bool  # sink / gated: modeling code in the directory
    prefix_token_id: Optional[int]  # None: lm-eval's default (BOS, else EOS)
    checkpoint: Optional[Path] = None  # the megasink step directory it came from


def _checkpoint_tokenizer(ckpt: Path, cfg, tokenizer: Optional[str]) -> str:
    """--tokenizer or the checkpoint's tokenizer (megasink.hf.tokenizer.find_tokenizer); a one-line error if none."""
    from megasink.hf.tokenizer import find_tokenizer

    found = find_tokenizer(ckpt, cfg.data.tokenizer, tokenizer)
    if found is not None:
        return str(found)
    data = ", ".join(map(str, cfg.data.path))
    raise ValueError(f"{ckpt} has no tokenizer (data.path: {data}; trained on synthetic token ids?): lm-eval "
                     "evaluates text; pass --tokenizer (a .model file or a tokenizer directory) if it was trained "
                     "on tokenized text")


def prepare_model(path, tmp_dir, tokenizer: Optional[str] = None) -> HFModel:
    """An HF directory for ``path``: the directory itself, or a megasink checkpoint exported into tmp_dir."""
    from megasink.config import load_config
    from megasink.hf import convert_checkpoint, is_hf_dir
    from megasink.checkpoint import resolve_checkpoint_dir

    if is_hf_dir(path):
        hf_cfg = json.loads((Path(path) / "config.json").read_text())
        return HFModel(Path(path), "auto_map" in hf_cfg, None)
    ckpt = resolve_checkpoint_dir(path)
    cfg = load_config(ckpt / "config.yaml")
    tok = _checkpoint_tokenizer(ckpt, cfg, tokenizer)
    out = convert_checkpoint(ckpt, Path(tmp_dir) / "hf", tokenizer=tok, progress=False)
    return HFModel(out, cfg.model.attention != "vanilla", prefix_token(tok), ckpt)


def prefix_token(tokenizer: str) -> Optional[int]:
    """The token a document follows in training: BOS when the tokenizer frames documents with it
    (its own encode adds one), else EOS."""
    from megasink.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    return tok.bos_id if tok.adds_bos else tok.eos_id


def task_manager(tasks: list, include_path: Optional[str]):
    """lm-eval's TaskManager knowing every task in ``tasks``; indexes the built-in tasks (~30 s)
    only when --include-path does not hold them all."""
    from lm_eval.tasks import TaskManager

    def missing(tm) -> list:
        return [t for t in tasks if not tm.match_tasks([t])]

    if include_path:
        if not Path(include_path).is_dir():
            raise FileNotFoundError(f"--include-path {include_path}: no such directory")
        tm = TaskManager(include_path=include_path, include_defaults=False)
        if not missing(tm):
            return tm
    tm = TaskManager(include_path=include_path)
    if missing(tm):
        where = f" nor in --include-path {include_path}" if include_path else ""
        raise ValueError(f"unknown task(s) {', '.join(missing(tm))}: not lm-eval tasks{where} "
                         "(list them with `lm-eval ls tasks`)")
    return tm


def run_lm_eval(model: HFModel, tasks: list, num_fewshot: Optional[int] = None, limit: Optional[float] = None,
                batch_size: int = 8, include_path: Optional[str] = None, device: str = "cpu",
                dtype: str = "float32", seed: int = 1234) -> dict:
    """lm-eval's ``simple_evaluate`` result dict for the HF directory of ``model``."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ImportError(f"lm-eval is not installed ({e}): {LM_EVAL_HINT}") from None

    tm = task_manager(tasks, include_path)
    with log_progress(sys.stderr):
        lm = HFLM(pretrained=str(model.path), trust_remote_code=model.remote_code, device=device,
                  batch_size=batch_size, dtype=dtype, prefix_token_id=model.prefix_token_id)
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                       task_manager=tm, log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                       torch_random_seed=seed, fewshot_random_seed=seed)


def _line_progress_class(base):
    """A subclass of tqdm class ``base`` for a log file: no bar and no carriage return; a whole
    line at most every LOG_INTERVAL_S seconds over all its bars (none for a short run), and a
    bar that wrote one writes its last state when it closes."""

    class LineProgress(base):
        last_line = time.monotonic()  # when any bar of this class last wrote (class-wide)
        wrote = False  # has this bar written a line (then it writes its last state when closed)

        def __init__(self, *args, **kwargs):
            kwargs["leave"] = False  # tqdm's own close only clears, which display ignores
            super().__init__(*args, **kwargs)

        def write_line(self) -> None:
            LineProgress.last_line, self.wrote = time.monotonic(), True
            elapsed = self.format_interval(self.format_dict["elapsed"])
            self.fp.write(f"lm-eval: {self.desc or 'progress'} {self.n}/{self.total or '?'} ({elapsed})\n")
            self.fp.flush()

        def display(self, msg=None, pos=None):
            if msg is None and time.monotonic() - LineProgress.last_line >= LOG_INTERVAL_S:
                self.write_line()
            return False

        def close(self):
            if not self.disable and self.wrote:
                self.write_line()
            super().close()

        def clear(self, nolock=False):
            pass

    return LineProgress


@contextmanager
def log_progress(stream):
    """While inside, progress as fits ``stream``: unchanged on a terminal; otherwise lm-eval's tqdm
    (the ``tqdm`` of every loaded lm_eval module and of the tqdm package, for its local imports)
    replaced by line progress, and transformers' and datasets' bars off; all restored on exit."""
    if stream.isatty():
        yield
        return
    import datasets
    import tqdm as tqdm_pkg
    from transformers.utils import logging as hf_logging

    def holders(cls) -> list:  # the tqdm package and each loaded lm_eval module whose tqdm is cls
        return [tqdm_pkg] + [m for name, m in list(sys.modules.items())
                             if name.startswith("lm_eval") and getattr(m, "tqdm", None) is cls]

    original = tqdm_pkg.tqdm
    replacement = _line_progress_class(original)
    bars_on = hf_logging.is_progress_bar_enabled(), not datasets.utils.are_progress_bars_disabled()
    for holder in holders(original):
        holder.tqdm = replacement
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        for holder in holders(replacement):  # also modules first imported inside
            holder.tqdm = original
        if bars_on[0]:
            hf_logging.enable_progress_bar()
        if bars_on[1]:
            datasets.enable_progress_bars()


def results_table(results: dict) -> str:
    """lm-eval's markdown tables: tasks, then groups when there are any."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def write_results(results: dict, out_dir) -> tuple[Path, Path]:
    """results.json and results.md (the table), written atomically."""
    from lm_eval.utils import handle_non_serializable

    from megasink.utils import atomic_write_text

    out = Path(out_dir)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=handle_non_serializable,
                                                       ensure_ascii=False) + "\n")
    atomic_write_text(out / "results.md", results_table(results))
    return out / "results.json", out / "results.md"


def default_out_dir(path) -> Path:
    """RUN/eval/step_N for a checkpoint inside a run's checkpoints/ directory; otherwise --out is needed."""
    from megasink.hf import is_hf_dir
    from megasink.checkpoint import resolve_checkpoint_dir

    if not is_hf_dir(path):
        ckpt = resolve_checkpoint_dir(path)
        if ckpt.parent.name == "checkpoints":
            return ckpt.parent.parent / "eval" / ckpt.name
    raise ValueError(f"{path} is not a checkpoint inside a run directory: pass --out DIR")


def evaluate(path, tasks: list, out_dir=None, tokenizer: Optional[str] = None, **lm_eval_kw) -> tuple[dict, Path]:
    """Evaluate a megasink checkpoint or HF directory on lm-eval ``tasks``; (results, out dir).

    The results are lm-eval's dict plus ``megasink``: the model, checkpoint, tasks and prefix token."""
    out = Path(out_dir) if out_dir else default_out_dir(path)
    with tempfile.TemporaryDirectory(prefix="megasink-eval-") as tmp:
        model = prepare_model(path, tmp, tokenizer)
        results = run_lm_eval(model, tasks, **lm_eval_kw)
    results["megasink"] = {"model": str(path), "checkpoint": str(model.checkpoint) if model.checkpoint else None,
                           "tasks": tasks, "prefix_token_id": model.prefix_token_id}
    write_results(results, out)
    return results, out


def _parse_limit(text: str) -> float:
    value = float(text)
    return int(value) if value >= 1 else value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="megasink eval", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a megasink checkpoint (any layout) or an HF model directory with lm-evaluation-harness "
                    "(exported to a temporary HF directory; sink / gated with trust_remote_code). Writes "
                    "results.json and results.md to --out and prints the table.",
        epilog="examples:\n"
               "  megasink eval runs/x --tasks hellaswag,piqa --batch-size 16        (online: hub datasets)\n"
               "  python tools/make_eval_task.py data/fwe_valid --out tasks/fwe\n"
               "  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 megasink eval runs/x --include-path tasks/fwe \\\n"
               "      --tasks megasink_next_passage,megasink_bpb                    (offline: local tasks)")
    p.add_argument("model", help="megasink run / checkpoints / step directory, or an HF model directory")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names (globs allowed)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per question (default: each task's own)")
    p.add_argument("--limit", type=_parse_limit, help="at most N examples per task (or a fraction if < 1)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass (default 8)")
    p.add_argument("--out", help="output directory (default: RUN/eval/step_N for a run's checkpoint)")
    p.add_argument("--include-path", help="directory of local task YAMLs (e.g. from tools/make_eval_task.py)")
    p.add_argument("--tokenizer", help="sentencepiece .model or Hugging Face tokenizer directory, for a checkpoint "
                   "that does not carry one")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="torch device (default cuda if present)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype during evaluation (default float32)")
    p.add_argument("--seed", type=int, default=1234, help="seed of lm-eval's few-shot sampling and generation")
    p.add_argument("--metrics-run", help="also append each task's main metric to RUN/metrics.jsonl and "
                                         "RUN/tensorboard (what train.lm_eval_tasks does)")
    p.add_argument("--step", type=int, help="with --metrics-run: the step to log (default: N of step_N)")
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        results, out = evaluate(args.model, tasks, args.out, args.tokenizer, num_fewshot=args.num_fewshot,
                                limit=args.limit, batch_size=args.batch_size, include_path=args.include_path,
                                device=args.device, dtype=args.dtype, seed=args.seed)
    except (ValueError, OSError, ImportError) as e:  # no tokenizer, unknown task, missing checkpoint or lm-eval
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(results_table(results))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}")
    if args.metrics_run:
        _log_to_run(args.metrics_run, args.step, results)
    return 0


def _log_to_run(run_dir: str, step: Optional[int], results: dict) -> None:
    from megasink.eval.background import append_metrics, main_metrics

    if step is None:
        name = Path(results["megasink"]["checkpoint"] or "").name
        step = int(name.split("_")[1]) if name.startswith("step_") and name[5:].isdigit() else 0
    record = main_metrics(results)
    append_metrics(run_dir, step, record)
    print(f"logged {', '.join(record)} at step {step} in {Path(run_dir) / 'metrics.jsonl'}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
