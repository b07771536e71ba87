"""Tensor parallelism inside the real trainer: layouts give the same numbers, checkpoints
move between layouts."""
import pytest

from dist_utils import run_distributed
from train_utils import TINY, losses, train_worker

CONFIG = "configs/tiny-gated.yaml"


def _train(tmp, name, world, extra):
    run_dir = tmp / name
    run_distributed(train_worker, world, CONFIG, TINY + [f"run_dir={run_dir}"] + extra)
    return run_dir


def _close(a: dict, b: dict, rel: float, keys=None):
    keys = keys or b.keys()
    for step in keys:
        assert abs(a[step] - b[step]) <= rel * abs(b[step]), (step, a[step], b[step])


@pytest.mark.slow
def test_tp2_dp2_zero1_matches_single_process(tmp_path):
    ref = _train(tmp_path, "ref", 1, ["train.steps=5"])
    run = _train(tmp_path, "tp2dp2", 4, ["train.steps=5", "parallel.tp=2", "parallel.zero_stage=1"])
    for key in ("loss", "aux_loss", "grad_norm"):
        _close(losses(run, key), losses(ref, key), 1e-5)
    assert max(losses(ref, "aux_loss").values()) > 1e-6


@pytest.mark.slow
def test_checkpoint_moves_from_tp2_to_tp1_and_back(tmp_path):
    common = ["train.steps=8", "train.save_interval=4", "train.keep_last=5"]
    tp2 = _train(tmp_path, "tp2", 2, common + ["parallel.tp=2"])
    tp1 = _train(tmp_path, "tp1_from_tp2", 1, common + [f"train.resume={tp2}/checkpoints/step_4"])
    assert sorted(losses(tp1)) == [5, 6, 7, 8]
    _close(losses(tp1), losses(tp2), 1e-5, keys=[5, 6, 7, 8])
    back = _train(tmp_path, "tp2_from_tp1", 2, common + ["parallel.tp=2", f"train.resume={tp1}/checkpoints/step_8",
                                                           "train.steps=10"])
    assert sorted(losses(back)) == [9, 10]
