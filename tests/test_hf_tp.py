"""HF export of a checkpoint trained under tensor parallelism (tp=2) for all three variants."""
import pytest
import torch

from dist_utils import run_distributed
from train_utils import TINY, train_worker


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["vanilla", "sink", "gated"])
def test_export_from_tp2_checkpoint_matches(tmp_path, variant):
    import transformers

    import megasink
    from megasink.hf.export import convert_checkpoint

    run_dir = tmp_path / "tp2"
    run_distributed(train_worker, 2, f"configs/tiny-{variant}.yaml",
                    TINY + [f"run_dir={run_dir}", "train.steps=2", "parallel.tp=2"])
    out = tmp_path / "hf"
    convert_checkpoint(run_dir, out)
    model, cfg = megasink.load_checkpoint(run_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=variant != "vanilla",
                                                           torch_dtype=torch.float32)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = model(tokens).logits, hf(tokens).logits
    assert (ours - theirs).abs().max() < 1e-4
    if variant == "vanilla":
        assert type(hf).__name__ == "LlamaForCausalLM"
