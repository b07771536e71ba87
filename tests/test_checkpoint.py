"""Checkpoint directory handling: resolution, latest pointer, pruning, weights-only saves,
damaged checkpoints, file modes."""
import json
import os

import pytest
import torch

import megasink
from megasink import checkpoint as ck


def _cfg():
    return megasink.load_config("configs/tiny-gated.yaml", ["model.n_layers=2", "model.tie_embeddings=true"])


def test_save_load_roundtrip_and_resolution(tmp_path):
    cfg = _cfg()
    torch.manual_seed(0)
    model = megasink.build_model(cfg.model, cfg.aux_loss)
    model.shared_heads[1, 2] = True
    root = tmp_path / "run" / "checkpoints"
    ck.save_model_checkpoint(model, cfg, root / "step_3")
    ck.update_latest(root, "step_3")
    for path in (tmp_path / "run", root, root / "step_3"):  # run dir, checkpoints dir, step dir
        loaded, _ = megasink.load_checkpoint(path)
        for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), n
    assert loaded.output.weight is loaded.tok_embeddings.weight  # tied stays tied
    assert not list(root.glob("*.tmp"))


def test_latest_pointing_at_incomplete_dir_is_an_error(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_5.tmp").mkdir(parents=True)
    ck.update_latest(root, "step_5")
    with pytest.raises(ck.CheckpointError, match="names step_5, which is not usable: .*only its unfinished .tmp"):
        ck.resolve_checkpoint_dir(root)
    with pytest.raises(FileNotFoundError, match="no megasink checkpoint"):
        ck.resolve_checkpoint_dir(tmp_path / "nothing")


def test_prune_keeps_newest_and_latest(tmp_path):
    cfg = _cfg()
    model = megasink.build_model(cfg.model)
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8, 10):
        ck.save_model_checkpoint(model, cfg, root / f"step_{step}")
    ck.update_latest(root, "step_4")  # e.g. resumed from an older one
    ck.prune_checkpoints(root, keep_last=2, in_use={"step_2"})  # a background evaluation reads step_2
    assert sorted(p.name for p in root.glob("step_*")) == ["step_10", "step_2", "step_4", "step_8"]
    ck.prune_checkpoints(root, keep_last=2)  # its evaluation ended
    assert sorted(p.name for p in root.glob("step_*")) == ["step_10", "step_4", "step_8"]


def _training_checkpoints(root, steps=(2, 4)):
    """Training-style checkpoints (weights, moments, state.json) at ``steps``; latest = the last."""
    cfg = _cfg()
    model = megasink.build_model(cfg.model)
    sd = ck.full_state_dict(model)
    optim = {f"exp_avg/{k}": torch.zeros_like(v) for k, v in sd.items()}
    for step in steps:
        state = {"step": step, "optimizer_step": step, "layout": {"tp": 1, "pp": 1, "dp": 1}}
        ck.write_checkpoint_dir(root / f"step_{step}", cfg, sd, optim, state)
        ck.update_latest(root, f"step_{step}")
    return model


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])


def _garble_header(path):
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\x00{]"
    path.write_bytes(bytes(data))


DAMAGE = {  # file -> (how, what the error says about it)
    "model.safetensors": (_truncate, "truncated or overwritten"),
    "optim.safetensors": (os.unlink, "is missing"),
    "state.json": (lambda p: p.write_text('{"step": 4, "optimizer_'), "does not parse"),
    "config.yaml": (lambda p: p.write_text("model: [unclosed"), "does not parse"),
}


@pytest.mark.parametrize("name", [*DAMAGE, "header"])
def test_damaged_latest_is_named_and_resume_falls_back(tmp_path, name, capsys):
    from megasink.hf.cli import to_hf_main

    root = tmp_path / "run" / "checkpoints"
    _training_checkpoints(root)
    fname, (damage, says) = (("model.safetensors", (_garble_header, "header does not parse")) if name == "header"
                             else (name, DAMAGE[name]))
    damaged = root / "step_4" / fname
    damage(damaged)
    # the step dir itself, and the run dir through `latest`: the same error, naming the file
    with pytest.raises(ck.CheckpointError, match=f"{damaged}.*{says}"):
        ck.resolve_checkpoint_dir(root / "step_4")
    with pytest.raises(ck.CheckpointError, match=f"names step_4.*{damaged}.*newest complete checkpoint is .*step_2"):
        megasink.load_checkpoint(tmp_path / "run")
    assert to_hf_main([str(tmp_path / "run"), str(tmp_path / "hf"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(damaged) in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "hf").exists()
    # train.resume: auto takes the newest complete checkpoint and says which file was damaged
    choice, note = ck.resume_candidate(root)
    assert choice == root / "step_2" and str(damaged) in note and "resuming from step_2" in note
    # pruning keeps the newest complete checkpoint although a damaged one is newer
    ck.prune_checkpoints(root, keep_last=1)
    assert (root / "step_2" / "model.safetensors").exists()


def test_resume_refuses_only_when_no_checkpoint_is_usable(tmp_path):
    root = tmp_path / "checkpoints"
    assert ck.resume_candidate(root) == (None, None)  # nothing saved yet: a fresh start
    _training_checkpoints(root)
    for step in (2, 4):
        _truncate(root / f"step_{step}" / "model.safetensors")
    with pytest.raises(ck.CheckpointError, match="no other checkpoint is complete.*train.resume=none"):
        ck.resume_candidate(root)


def test_pipeline_checkpoint_needs_every_stage(tmp_path):
    root = tmp_path / "checkpoints"
    _training_checkpoints(root, steps=(2,))
    d = root / "step_2"
    state = json.loads((d / "state.json").read_text())
    state["layout"]["pp"] = 2
    (d / "state.json").write_text(json.dumps(state))
    for kind in ("model", "optim"):
        os.replace(d / f"{kind}.safetensors", d / f"{kind}-stage0-of-2.safetensors")
    assert ck.checkpoint_problem(d) == f"{d / 'model-stage1-of-2.safetensors'} is missing (and 1 more)"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_plain_open_mode(tmp_path, umask):
    from megasink.hf.export import write_safetensors
    from megasink.utils import atomic_write_json

    old = os.umask(umask)
    try:
        with open(tmp_path / "reference", "w"):
            pass
        _training_checkpoints(tmp_path / "checkpoints", steps=(2,))
        atomic_write_json(tmp_path / "importance.json", {"a": 1})
        write_safetensors([("w", torch.zeros(3))], tmp_path, torch.float32, progress=False)
    finally:
        os.umask(old)
    expected = (tmp_path / "reference").stat().st_mode & 0o777
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "reference"]
    assert len(written) >= 7  # config.yaml, model/optim.safetensors, state.json, latest, importance.json, export
    assert {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in written} == \
        {str(p.relative_to(tmp_path)): oct(expected) for p in written}
