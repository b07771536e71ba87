"""Sharded checkpoints across layouts in the real trainer: a checkpoint written by one (tp, pp, dp,
ZeRO) layout, loaded by another and saved again, holds bit-identical weights and AdamW moments;
training resumed in another layout continues the run; the unsharded format still loads."""
import gc
import json
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from train_utils import TINY, losses, train_worker

CONFIG = "configs/tiny-sink.yaml"
COMMON = TINY + ["model.n_layers=4", "train.steps=4", "train.save_interval=2", "train.keep_last=5"]
LAYOUTS = {
    "tp2_dp2_z1": (4, ["parallel.tp=2", "parallel.zero_stage=1"]),
    "single": (1, ["parallel.zero_stage=0"]),
    "pp2_z1": (2, ["parallel.pp=2", "parallel.zero_stage=1"]),
    "pp2_z0": (2, ["parallel.pp=2", "parallel.zero_stage=0", "train.grad_clip=0"]),  # reloads only
    "dp2_z3": (2, ["parallel.zero_stage=3"]),
    "dp2_z2": (2, ["parallel.zero_stage=2"]),
    "tp2_z0": (2, ["parallel.tp=2", "parallel.zero_stage=0"]),
    "tp2_z1": (2, ["parallel.tp=2", "parallel.zero_stage=1"]),
}


def reload_worker(rank, world_size, config, overrides, ckpt_dir, sharded):
    """Load ``ckpt_dir`` into this layout and save it again at once (no step in between)."""
    from megasink.config import load_config
    from megasink.parallel.dims import init_distributed, teardown_distributed
    from megasink.train import state as train_state
    from megasink.train.main import build_everything

    if not sharded:
        original = train_state.save_training_state
        train_state.save_training_state = lambda *a, **kw: original(*a, **kw, sharded=False)
    cfg = load_config(config, overrides)
    dims = init_distributed(cfg)
    try:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        trainer = build_everything(cfg, dims, Path(ckpt_dir))
        trainer.resume(Path(ckpt_dir))
        saved = str(trainer.save())
        del trainer  # as in train.main.run: the engine is gone before the process groups are
        gc.collect()
        return saved
    finally:
        teardown_distributed()


def _train(tmp, name, layout, extra=()):
    world, args = LAYOUTS[layout]
    run_dir = tmp / name
    run_distributed(train_worker, world, CONFIG, COMMON + args + [f"run_dir={run_dir}", *extra])
    return run_dir


def _reload(tmp, name, layout, ckpt_dir, sharded=True) -> Path:
    world, args = LAYOUTS[layout]
    out = run_distributed(reload_worker, world, CONFIG, COMMON + args + [f"run_dir={tmp / name}"], str(ckpt_dir),
                          sharded)
    return Path(out[0])


def _assert_same_state(a: Path, b: Path):
    from megasink.checkpoint import load_model_tensors, load_optim_tensors

    for load in (load_model_tensors, load_optim_tensors):
        ta, tb = load(a), load(b)
        assert ta.keys() == tb.keys() and len(ta) > 10
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (a, b, k)
    sa, sb = (json.loads((d / "state.json").read_text()) for d in (a, b))
    assert sa["step"] == sb["step"] and sa["optimizer_step"] == sb["optimizer_step"] and sa["loader"] == sb["loader"]


def _close(a: dict, b: dict, keys, rel=1e-5):
    for step in keys:
        assert abs(a[step] - b[step]) <= rel * abs(b[step]), (step, a[step], b[step])


@pytest.mark.slow
def test_tp2_dp2_zero1_checkpoint_loads_in_one_process_and_in_pp2(tmp_path):
    src = _train(tmp_path, "src", "tp2_dp2_z1")
    step2 = src / "checkpoints" / "step_2"
    manifest = json.loads((step2 / "manifest.json").read_text())
    assert len(manifest["files"]) == 8 and manifest["layout"]["zero"] == 1  # 4 ranks x (model, optim)
    wq = manifest["tensors"]["exp_avg"]["layers.0.attention.wq.weight"]
    assert wq["split"] == {"dim": 0, "sizes": [32, 32]} and len(wq["pieces"]) >= 2
    for layout in ("single", "pp2_z1"):
        again = _reload(tmp_path, f"again_{layout}", layout, step2)
        _assert_same_state(step2, again)
    # and training goes on from it in one process as it did in tp2 x dp2
    single = _train(tmp_path, "single", "single", [f"train.resume={step2}"])
    assert sorted(losses(single)) == [3, 4]
    _close(losses(single), losses(src), [3, 4])


@pytest.mark.slow
def test_dp2_zero3_checkpoint_loads_in_tp2_and_back(tmp_path):
    src = _train(tmp_path, "src", "dp2_z3")
    step2 = src / "checkpoints" / "step_2"
    in_tp2 = _reload(tmp_path, "tp2", "tp2_z1", step2)
    _assert_same_state(step2, in_tp2)
    back = _reload(tmp_path, "z3", "dp2_z3", in_tp2)  # tp2 ZeRO-1 -> dp2 ZeRO-3
    _assert_same_state(step2, back)
    tp2 = _train(tmp_path, "tp2_train", "tp2_z1", [f"train.resume={step2}"])
    _close(losses(tp2), losses(src), [3, 4])


@pytest.mark.slow
def test_zero2_and_pipeline_zero0_round_trip(tmp_path):
    src = _train(tmp_path, "src", "dp2_z2")
    step4 = src / "checkpoints" / "step_4"
    in_pp = _reload(tmp_path, "pp", "pp2_z0", step4)
    _assert_same_state(step4, in_pp)
    _assert_same_state(step4, _reload(tmp_path, "tp", "tp2_z0", in_pp))


@pytest.mark.slow
def test_unsharded_checkpoints_still_load_in_any_layout(tmp_path):
    src = _train(tmp_path, "src", "tp2_z1")
    step2 = src / "checkpoints" / "step_2"
    old = _reload(tmp_path, "old", "tp2_dp2_z1", step2, sharded=False)  # today's unsharded writer
    assert (old / "model.safetensors").exists() and not (old / "manifest.json").exists()
    _assert_same_state(step2, old)
    for layout in ("pp2_z1", "dp2_z3"):
        _assert_same_state(step2, _reload(tmp_path, f"from_old_{layout}", layout, old))
