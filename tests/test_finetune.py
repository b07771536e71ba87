"""Fine-tuning mode: init_from a checkpoint, top-m shared heads measured at step 0 and
excluded from the CV, shared and routed importance logged separately."""
import json

import pytest
import torch

from dist_utils import run_distributed
from train_utils import TINY, read_metrics, train_worker

CONFIG = "configs/tiny-sink.yaml"


@pytest.mark.slow
def test_finetune_with_shared_heads(tmp_path):
    from megasink.data import build_dataset, build_loader
    from megasink.model import importance as imp_lib
    from megasink.checkpoint import load_full_model, resolve_checkpoint_dir

    base = tmp_path / "base"
    run_distributed(train_worker, 1, CONFIG, TINY + [f"run_dir={base}", "train.steps=3"])
    ft = tmp_path / "ft"
    run_distributed(train_worker, 1, CONFIG, TINY + [f"run_dir={ft}", "train.steps=3", "aux_loss.shared_heads=1",
                                                      "aux_loss.coef=0.01", f"train.init_from={base}"])
    # independent reference: importance of the *starting* model on the first micro-batch
    start, cfg = load_full_model(base)
    ds = build_dataset(cfg.data, cfg.model.seq_len, cfg.model.vocab_size, cfg.train.seed)
    b = build_loader(ds, cfg.train.micro_batch_size, 0, 1, cfg.train.seed).next_batch()
    with torch.no_grad():
        imp = start(b["tokens"], b["doc_ids"]).importance
    expected = imp_lib.top_m_shared(imp, 1)
    tuned, _ = load_full_model(ft)
    assert torch.equal(tuned.shared_heads, expected)
    recs = [r for r in read_metrics(ft) if "loss" in r]
    assert all("importance_shared_mean" in r and "importance_routed_mean" in r for r in recs)
    last = [r for r in recs if "importance" in r][-1]
    logged = torch.tensor(last["importance"])
    cv_routed = imp_lib.cv_squared(logged, ~expected).sqrt()
    assert torch.allclose(torch.tensor(last["cv"]), cv_routed, atol=1e-5)
    assert abs(last["aux_loss"] - 0.01 * float(cv_routed.pow(2).sum())) < 1e-6 + 1e-3 * last["aux_loss"]
    # the starting weights really came from the base checkpoint (and then moved)
    assert resolve_checkpoint_dir(ft).name == "step_3"


def test_init_from_mismatched_checkpoint_is_refused(tmp_path):
    import megasink
    from megasink.checkpoint import save_model_checkpoint
    from megasink.train.main import load_initial_weights

    cfg = megasink.load_config(CONFIG, TINY)
    save_model_checkpoint(megasink.build_model(cfg.model), cfg, tmp_path / "sink")
    other = megasink.load_config("configs/tiny-gated.yaml", TINY + [f"train.init_from={tmp_path / 'sink'}"])
    with pytest.raises(ValueError, match="does not match the model config"):
        load_initial_weights(megasink.build_model(other.model), other)
