"""User errors (bad data, checkpoints that do not fit) are one line and exit 2; bugs keep tracebacks.

One process: ``main()`` in this process. Under torchrun: rank 0 prints the line once, the
other ranks stay quiet, and no traceback from megasink's code reaches the output.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dist_utils import free_port
from train_utils import TINY

CONFIG = "configs/tiny-sink.yaml"
REPO = Path(__file__).resolve().parents[1]
VOCAB = 128  # TINY's model.vocab_size


def _corpus(prefix: Path, docs: int = 40) -> Path:
    from megasink.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    w = IndexedDatasetWriter(prefix, np.uint16)
    for _ in range(docs):
        w.add_document(rng.integers(0, VOCAB, size=int(rng.integers(20, 60))))
    w.finalize()
    w.commit()
    return prefix


def _truncated_bin(tmp):
    p = _corpus(tmp / "c")
    data = Path(f"{p}.bin").read_bytes()
    Path(f"{p}.bin").write_bytes(data[: len(data) // 2])
    return [f"data.path=[{p}]"], f"{p}.bin: "


def _corrupted_idx(tmp):
    p = _corpus(tmp / "c")
    with open(f"{p}.idx", "r+b") as f:
        f.write(b"NOTMMAP")
    return [f"data.path=[{p}]"], f"{p}.idx: not a Megatron indexed dataset index"


def _vocab_too_small(tmp):
    p = _corpus(tmp / "c")
    Path(f"{p}.meta.json").write_text(json.dumps({"tokenizer": {"vocab_size": 4 * VOCAB, "model": "t.model"}}))
    return [f"data.path=[{p}]"], f"larger than model.vocab_size={VOCAB}"


def _init_from_other_shape(tmp):
    import megasink
    from megasink.checkpoint import save_model_checkpoint

    cfg = megasink.load_config(CONFIG, TINY + ["model.d_model=32"])
    save_model_checkpoint(megasink.build_model(cfg.model), cfg, tmp / "other")
    return [f"train.init_from={tmp / 'other'}"], f"train.init_from={tmp / 'other'}: does not match the model config"


def _negative_lr(tmp):
    return ["train.lr=-1"], "train.lr must be > 0, got -1.0"


def _zero_lr(tmp):
    return ["train.lr=0"], "train.lr must be > 0, got 0.0"


def _min_lr_above_lr(tmp):
    return ["train.lr=1e-3", "train.min_lr=1e-2"], "train.min_lr must be in [0, train.lr = 0.001]"


def _missing_tokenizer(tmp):
    p = _corpus(tmp / "c")
    return [f"data.path=[{p}]", f"data.tokenizer={tmp / 'no.model'}"], f"data.tokenizer={tmp / 'no.model'} does not exist"


CASES = {"truncated_bin": _truncated_bin, "corrupted_idx": _corrupted_idx, "vocab_too_small": _vocab_too_small,
         "init_from_shape": _init_from_other_shape, "negative_lr": _negative_lr, "zero_lr": _zero_lr,
         "min_lr_above_lr": _min_lr_above_lr, "missing_tokenizer": _missing_tokenizer}


@pytest.fixture
def one_process_env(monkeypatch):
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("case", CASES)
def test_user_error_is_one_line_exit_2(tmp_path, case, one_process_env, capsys):
    """... and a run directory the failed start created is not left behind."""
    from megasink.train.main import main

    overrides, message = CASES[case](tmp_path)
    assert main([CONFIG, *TINY, f"run_dir={tmp_path / 'run'}", "train.steps=2", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("megasink: ") and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change,named", [
    (["model.n_layers=3"], "model.n_layers=2 (this config: 3)"),
    (["model.d_model=32"], "model.d_model=64 (this config: 32)"),
    (["model.attention=gated"], "model.attention='sink' (this config: 'gated')"),
])
def test_resume_into_another_model_is_one_line_and_touches_nothing(tmp_path, change, named, one_process_env, capsys):
    """A run dir holding another model's checkpoint: one line naming the differing keys, exit 2,
    the checkpoint, config.yaml and metrics untouched (byte for byte)."""
    from megasink.train.main import main

    run = tmp_path / "run"
    assert main([CONFIG, *TINY, f"run_dir={run}", "train.steps=1"]) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main([CONFIG, *TINY, f"run_dir={run}", "train.steps=2", *change]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot resume from" in err and named in err, err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_under_torchrun_rank0_prints_the_line_once(tmp_path):
    overrides, message = _truncated_bin(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), "-m", "megasink.train", CONFIG, *TINY,
                           f"run_dir={tmp_path / 'run'}", *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count(message) == 1, out[-3000:]
    assert f'File "{REPO / "megasink"}' not in out, out[-3000:]  # torchrun's own report only
