"""HF models under tensor and pipeline parallelism: the export of a checkpoint trained with tp=2 (all three
variants), and models converted from the families people fine-tune (Llama 3.x, Qwen2, Qwen3, Mistral)
under tp=2 against transformers, and fine-tuned under tp=2 and pp=2 against one process."""
import pytest
import torch

from dist_utils import init_gloo, run_distributed
from test_hf_helpers import FAMILY_NAMES, save_family
from train_utils import TINY, losses, train_worker


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


VARIANTS = ("vanilla", "sink", "gated")


def _tokens():
    return torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(3))


def _converted_tp_worker(rank, world_size, hf_dirs):
    """Each family converted to each variant, unsharded and under tp: the gathered logits of both."""
    import torch.distributed as dist

    from megasink.hf import import_model
    from megasink.parallel.dims import ParallelDims
    from megasink.parallel.state_utils import gather_tp_tensor
    from megasink.parallel.tensor import apply_tensor_parallel

    init_gloo(rank, world_size)
    dims = ParallelDims(tp=world_size, pp=1, dp=1, rank=rank)
    dims.build_groups()
    out = {}
    for name, hf_dir in hf_dirs.items():
        for variant in VARIANTS:
            model, _, _ = import_model(hf_dir, attention=variant, progress=False)
            with torch.no_grad():
                full = model(_tokens()).logits
                sharded = apply_tensor_parallel(model, dims)(_tokens()).logits  # (B, T, V / tp)
            out[name, variant] = full, gather_tp_tensor(sharded, 2, dims)
    dist.destroy_process_group()
    return out


@pytest.mark.slow
def test_converted_families_under_tp2_match_transformers(tmp_path):
    """Biases split with their heads, q/k norms replicated, scaled RoPE and tied embeddings under tp=2:
    vanilla and gated logits within 1e-4 of transformers', sink within 1e-5 of the unsharded model."""
    import transformers

    hf_dirs = {name: save_family(name, tmp_path / name) for name in FAMILY_NAMES}
    results = run_distributed(_converted_tp_worker, 2, hf_dirs)
    for name, hf_dir in hf_dirs.items():
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
        with torch.no_grad():
            ref = hf(_tokens()).logits
        for variant in VARIANTS:
            for rank, res in enumerate(results):
                full, sharded = res[name, variant]
                assert (sharded - full).abs().max() <= 1e-5, (name, variant, rank)
                if variant != "sink":
                    assert (sharded - ref).abs().max() <= 1e-4, (name, variant, rank)


# family -> the variant it is converted to for the fine-tuning runs (each variant at least once)
FINETUNE = {"llama3": "vanilla", "qwen2": "gated", "qwen3": "sink", "mistral": "sink"}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FINETUNE))
def test_converted_family_finetunes_the_same_under_tp2_and_pp2(tmp_path, name):
    """convert_from_hf -> train.init_from under one process, tp=2 and pp=2 (tied embeddings across
    stages for llama3): two steps, the same loss, aux loss and gradient norm."""
    from megasink.hf.cli import from_hf_main

    hf_dir = save_family(name, tmp_path / "hf")
    ckpt = tmp_path / "ckpt"
    assert from_hf_main([str(hf_dir), str(ckpt), "--attention", FINETUNE[name], "--no-progress"]) == 0
    common = ["model.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=4", "train.log_interval=1",
              "train.progress=false", "train.warmup_steps=1", "train.steps=2", "aux_loss.coef=1",
              "train.save_checkpoints=false", f"train.init_from={ckpt}"]
    runs = {}
    for layout, world, extra in (("one", 1, []), ("tp2", 2, ["parallel.tp=2"]), ("pp2", 2, ["parallel.pp=2"])):
        runs[layout] = tmp_path / layout
        run_distributed(train_worker, world, str(ckpt / "config.yaml"), common + [f"run_dir={runs[layout]}"] + extra)
    assert losses(runs["one"], "aux_loss")[2] > 0  # the gates moved apart: the aux loss is compared too
    for key in ("loss", "aux_loss", "grad_norm"):
        ref = losses(runs["one"], key)
        assert sorted(ref) == [1, 2]
        for layout in ("tp2", "pp2"):
            got = losses(runs[layout], key)
            for step in ref:
                assert abs(got[step] - ref[step]) <= 1e-5 * abs(ref[step]) + 1e-9, (layout, key, step)
