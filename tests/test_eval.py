"""Downstream evaluation, offline: tools/make_eval_task.py writes local tasks from a fixture corpus
(raw or tokenized), fitted to the model's length; ``megasink eval`` runs them with
lm-evaluation-harness on tiny trained sink and gated checkpoints (through the HF export, remote
code) without truncation warnings and, off a terminal, without progress bars; the BPB task's
bits/byte equals megasink's own rolling-window scoring; a checkpoint without a tokenizer gets a
one-line error."""
import contextlib
import io
import json
import logging
import os
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import build_seeded, small_model_cfg
from data_fixtures import data_documents
from megasink import load_checkpoint
from megasink.cli import main as cli_main
from megasink.config import Config
from megasink.eval.scoring import bits_per_byte, rolling_windows
from megasink.eval.tasks import NUM_CHOICES, make_eval_tasks
from megasink.eval.tasks import main as make_task_main
from megasink.checkpoint import save_model_checkpoint, update_latest
from test_hf_helpers import MODEL_VOCAB, train_spm, write_tokenized

TASKS = ["megasink_next_passage", "megasink_bpb"]
NUM_DOCS = 12
MODEL_LEN = small_model_cfg().seq_len  # the tiny models' trained length: the questions are fitted to it


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(root, sentencepiece model, validation texts, their .jsonl, task directory)."""
    root = tmp_path_factory.mktemp("eval_corpus")
    spm_path = train_spm(root / "spm")
    texts = [t[:1000].rsplit(" ", 1)[0] if len(t) > 1000 else t for t in data_documents(NUM_DOCS, seed=5)]
    (root / "valid.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert make_task_main([str(root / "valid.jsonl"), "--out", str(root / "tasks"), "--context-words", "24",
                           "--passage-words", "8", "--max-tokens", str(MODEL_LEN), "--tokenizer", str(spm_path)]) == 0
    return root, spm_path, texts, root / "valid.jsonl", root / "tasks"


def _train_tiny(variant, spm_path, texts, run_dir, steps=10):
    """A tiny model trained a few AdamW steps on the corpus, saved as RUN/checkpoints/step_N."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    ids = torch.tensor(np.concatenate([sp.encode(t) + [sp.eos_id()] for t in texts]))
    cfg = Config(model=small_model_cfg(variant, vocab_size=MODEL_VOCAB))
    model = build_seeded(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    T = cfg.model.seq_len
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - T - 1, (4,), generator=g)
        batch = torch.stack([ids[s:s + T + 1] for s in starts])  # (4, T + 1)
        out = model(batch[:, :-1], targets=batch[:, 1:])
        opt.zero_grad()
        (out.loss + out.aux_loss).backward()
        opt.step()
    save_model_checkpoint(model, cfg, run_dir / "checkpoints" / f"step_{steps}", tokenizer=str(spm_path))
    update_latest(run_dir / "checkpoints", f"step_{steps}")
    return run_dir


@contextlib.contextmanager
def _offline():
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update({k: "1" for k in saved})
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module", params=["sink", "gated"])
def evaluated(request, corpus):
    """One offline `megasink eval` of both generated tasks per variant, its stderr a file (not a
    terminal): (variant, run dir, stdout, stderr, lm-eval's warnings)."""
    pytest.importorskip("lm_eval")
    root, spm_path, texts, _, tasks = corpus
    run = _train_tiny(request.param, spm_path, texts, root / f"run_{request.param}")
    stdout, stderr, warnings = io.StringIO(), io.StringIO(), _Records()
    logging.getLogger("lm_eval").addHandler(warnings)
    try:
        with _offline(), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = cli_main(["eval", str(run), "--include-path", str(tasks), "--tasks", ",".join(TASKS),
                           "--batch-size", "16", "--device", "cpu", "--metrics-run", str(run)])
    finally:
        logging.getLogger("lm_eval").removeHandler(warnings)
    assert rc == 0, stderr.getvalue()[-3000:]
    return request.param, run, stdout.getvalue(), stderr.getvalue(), warnings.messages


def test_make_eval_task_files(corpus, tmp_path):
    import sentencepiece as spm

    root, spm_path, texts, valid, tasks = corpus
    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    manifest = json.loads((tasks / "manifest.json").read_text())
    assert manifest["tasks"] == TASKS and manifest["num_documents"] == NUM_DOCS
    assert manifest["max_tokens"] == MODEL_LEN and manifest["num_shortened"] > 0
    rows = [json.loads(line) for line in (tasks / "next_passage.jsonl").read_text().splitlines()]
    assert len(rows) == manifest["num_questions"] >= NUM_DOCS // 2
    for r in rows:
        assert len(set(r["choices"])) == NUM_CHOICES and 0 <= r["label"] < NUM_CHOICES
        gold = r["choices"][r["label"]]
        follows = [t for t in texts if r["context"] in t
                   and t[t.index(r["context"]) + len(r["context"]):].lstrip().startswith(gold)]
        assert len(follows) == 1  # the gold choice follows the context in its document
        doc = follows[0]
        assert 1 <= len(r["context"].split()) <= 24 and all(len(c.split()) == 8 for c in r["choices"])
        assert doc.split()[:24][-len(r["context"].split()):] == r["context"].split()  # the last of 24 words
        assert max(len(sp.encode(r["context"] + " " + c)) for c in r["choices"]) < MODEL_LEN  # fits, EOS too
    assert len({r["label"] for r in rows}) > 1  # the answer's position varies
    for name in ("next_passage", "bpb"):
        cfg = yaml.safe_load((tasks / f"{name}.yaml").read_text())
        data_file = Path(cfg["dataset_kwargs"]["data_files"]["test"])
        assert cfg["dataset_path"] == "json" and data_file.is_absolute() and data_file.is_file()
    bpb_docs = [json.loads(line)["text"] for line in (tasks / "bpb.jsonl").read_text().splitlines()]
    assert bpb_docs == texts
    # token ids in, decoded with the tokenizer: the documents of the text input, through sentencepiece
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    write_tokenized(tmp_path / "valid", texts, spm_path)
    d = make_eval_tasks([str(tmp_path / "valid")], tmp_path / "tok_tasks", tokenizer=str(spm_path), name="tok",
                        context_words=24, passage_words=8)
    assert d.tasks == ["tok_next_passage", "tok_bpb"] and d.num_documents == NUM_DOCS
    decoded = [json.loads(line)["text"] for line in (tmp_path / "tok_tasks" / "bpb.jsonl").read_text().splitlines()]
    assert decoded == [sp.decode(sp.encode(t)) for t in texts]
    unfitted = [json.loads(line) for line in (tmp_path / "tok_tasks" / "next_passage.jsonl").read_text().splitlines()]
    assert d.max_tokens is None and all(len(r["context"].split()) == 24 for r in unfitted)
    with pytest.raises(ValueError, match="need their tokenizer"):
        make_eval_tasks([str(tmp_path / "valid")], tmp_path / "no_tok")
    with pytest.raises(FileExistsError, match="--overwrite"):
        make_eval_tasks([str(valid)], tmp_path / "tok_tasks")
    with pytest.raises(ValueError, match="lower --context-words"):
        make_eval_tasks([str(valid)], tmp_path / "long", context_words=5000)


def test_eval_writes_results_and_table(evaluated):
    variant, run, stdout, _, _ = evaluated
    out = run / "eval" / "step_10"  # the default --out of a run's checkpoint
    res = json.loads((out / "results.json").read_text())
    mc, bpb = res["results"]["megasink_next_passage"], res["results"]["megasink_bpb"]
    assert 0.0 <= mc["acc,none"] <= 1.0 and 0.0 <= mc["acc_norm,none"] <= 1.0
    assert 0.0 < bpb["bits_per_byte,none"] < 20.0 and bpb["byte_perplexity,none"] > 1.0
    assert res["megasink"]["checkpoint"].endswith("step_10") and res["megasink"]["prefix_token_id"] == 2
    table = (out / "results.md").read_text()
    for text in (table, stdout):
        assert all(t in text for t in TASKS) and "bits_per_byte" in text and "acc" in text
    assert f"wrote {out / 'results.json'}" in stdout
    # --metrics-run (what train.lm_eval_tasks runs): each task's main metric, at the checkpoint's step
    (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert record == {"step": 10, "lm_eval/megasink_next_passage/acc": mc["acc,none"],
                      "lm_eval/megasink_bpb/bits_per_byte": bpb["bits_per_byte,none"]}
    assert list((run / "tensorboard").glob("events.out.tfevents.*.lm_eval"))


def test_bpb_task_equals_megasink_scoring(evaluated, corpus):
    """lm-eval's rolling log-likelihood through the HF export = megasink's forward on the same windows."""
    import sentencepiece as spm

    variant, run, _, _, _ = evaluated
    _, spm_path, texts, _, _ = corpus
    res = json.loads((run / "eval" / "step_10" / "results.json").read_text())["results"]["megasink_bpb"]
    model, cfg = load_checkpoint(run)
    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    ours = bits_per_byte(model, texts, sp.encode, sp.eos_id(), cfg.model.seq_len)
    assert abs(ours - res["bits_per_byte,none"]) <= 1e-3, (ours, res["bits_per_byte,none"])
    assert max(len(rolling_windows(len(sp.encode(t)), cfg.model.seq_len)) for t in texts) >= 3  # windows roll


def test_no_truncation_and_no_bars_in_a_log(evaluated):
    """A log of `megasink eval` once held lm-eval's "Truncating N tokens from the left" per request
    (questions longer than the model) and a progress bar per document."""
    _, _, _, stderr, warnings = evaluated
    assert not [w for w in warnings if "Truncating" in w], warnings[:3]
    assert "\r" not in stderr and "it/s" not in stderr and "examples/s" not in stderr, stderr[-2000:]
    assert len(stderr.splitlines()) <= 5, stderr[-2000:]


def test_progress_lines_off_a_terminal(monkeypatch):
    """Off a terminal lm-eval's tqdm writes whole lines, at most one per LOG_INTERVAL_S; on a
    terminal, and after the block, tqdm is lm-eval's own."""
    pytest.importorskip("lm_eval")
    import lm_eval.api.model as lm_model
    import tqdm

    from megasink.eval import harness

    original = tqdm.tqdm
    log = io.StringIO()
    monkeypatch.setattr(harness, "LOG_INTERVAL_S", 0.0)
    with harness.log_progress(log):
        assert lm_model.tqdm is not original and tqdm.tqdm is not original
        for _ in lm_model.tqdm(range(3), desc="Running requests", file=log):  # lm-eval's: sys.stderr
            pass
        with lm_model.tqdm(total=4, desc="quiet", disable=True, file=log) as bar:
            bar.update(4)
    assert lm_model.tqdm is original and tqdm.tqdm is original
    lines = log.getvalue().split("\n")
    assert "\r" not in log.getvalue() and lines[-1] == ""  # whole lines only
    assert lines[0].startswith("lm-eval: Running requests 0/3 (") and lines[-2].startswith("lm-eval: Running "
                                                                                          "requests 3/3 (")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    with harness.log_progress(Terminal()):
        assert lm_model.tqdm is original


def test_rolling_windows_cover_each_token_once():
    for n, L in ((1, 4), (4, 4), (5, 4), (13, 4), (100, 48)):
        windows = rolling_windows(n, L)
        assert [t for _, s, e in windows for t in range(s, e)] == list(range(n))
        for first, start, end in windows:
            assert end - first <= L and (first == 0 or end - first == L)  # full context once it exists


def test_eval_without_tokenizer_is_one_line_error(tmp_path, capsys):
    cfg = Config(model=small_model_cfg("sink", vocab_size=MODEL_VOCAB))
    save_model_checkpoint(build_seeded(cfg.model), cfg, tmp_path / "step_1")
    assert cli_main(["eval", str(tmp_path / "step_1"), "--tasks", "x", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has no tokenizer" in err and "--tokenizer" in err
    assert cli_main(["eval", str(tmp_path / "missing"), "--tasks", "x", "--out", str(tmp_path / "o")]) == 2
    assert "no megasink checkpoint" in capsys.readouterr().err


def test_scripts_help(monkeypatch, capsys):
    for script in ("make_eval_task.py", "ablate_heads.py"):
        monkeypatch.setattr("sys.argv", [script, "--help"])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(Path(__file__).parents[1] / "tools" / script), run_name="__main__")
        assert exit_info.value.code == 0 and "usage" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("megasink.eval", run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 0 and "lm-evaluation-harness" in capsys.readouterr().out


@pytest.mark.slow
def test_background_eval_never_stops_training(tmp_path):
    """train.lm_eval_tasks: rank 0 starts `megasink eval` of each eval_interval checkpoint and goes on;
    here every evaluation fails (synthetic data has no tokenizer) and training finishes regardless."""
    import time

    from dist_utils import run_distributed
    from train_utils import TINY, read_metrics, train_worker

    run = tmp_path / "run"
    result = run_distributed(train_worker, 1, "configs/tiny-sink.yaml", TINY + [
        f"run_dir={run}", "train.steps=4", "train.eval_interval=2", "train.lm_eval_tasks=megasink_bpb",
        "train.lm_eval_args=--limit 2"])
    assert result[0]["step"] == 4 and not result[0]["preempted"]
    assert max(m["step"] for m in read_metrics(run)) == 4
    logs = [run / "eval" / f"step_{s}" / "eval.log" for s in (2, 4)]
    deadline = time.time() + 120
    while not all(p.is_file() and "has no tokenizer" in p.read_text() for p in logs) and time.time() < deadline:
        time.sleep(0.5)  # the evaluations run on after training
    for p in logs:
        assert "has no tokenizer" in p.read_text()


def test_background_eval_checkpoints_in_use(tmp_path, monkeypatch):
    """A running evaluation's checkpoint is in use (pruning keeps it) until the process ends."""
    import sys

    from megasink.eval import background

    monkeypatch.setattr(background, "eval_command", lambda *a: [sys.executable, "-c", "import time; time.sleep(60)"])
    evals = background.BackgroundEvals(tmp_path, "t", log=lambda msg: None)
    evals.start(2, None)  # no checkpoint saved: nothing starts
    assert evals.in_use() == set()
    evals.start(2, tmp_path / "checkpoints" / "step_2")
    assert evals.in_use() == {"step_2"}
    proc, _ = evals.running[2]
    proc.kill()
    proc.wait()
    assert evals.in_use() == set() and not evals.running


def test_main_metrics_and_config_check():
    from megasink.config import ConfigError, load_config
    from megasink.eval.background import eval_command, main_metrics

    results = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.7},
                           "u": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A"}},
               "configs": {"t": {"metric_list": [{"metric": "acc_norm"}, {"metric": "acc"}]}}}
    assert main_metrics(results) == {"lm_eval/t/acc_norm": 0.7, "lm_eval/u/exact_match": 0.25}
    cmd = eval_command("ck/step_3", "runs/x", 3, "a,b", "--limit 5 --include-path 'my tasks'")
    assert cmd[-4:] == ["--limit", "5", "--include-path", "my tasks"] and "--metrics-run" in cmd
    with pytest.raises(ConfigError, match="train.eval_interval > 0"):
        load_config("configs/tiny-sink.yaml", ["train.lm_eval_tasks=hellaswag"])
