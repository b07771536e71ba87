"""The DeepSpeed engine's settings and optimizer state as the GPU path needs them (checked on the CPU)."""
import os

import pytest
import torch

from megasink.config import ConfigError, load_config
from megasink.parallel.dims import ParallelDims
from megasink.parallel.engine import deepspeed_config, step_state


def test_bf16_accumulates_gradients_in_fp32():
    """bf16 with ZeRO: DeepSpeed's data_types.grad_accum_dtype fp32 (its default accumulates in bf16;
    the 0.6B config sums 128 micro-batches per step)."""
    for zero in (1, 2, 3):
        cfg = load_config("configs/0.6b-sink.yaml", [f"parallel.zero_stage={zero}"])
        ds = deepspeed_config(cfg, ParallelDims.from_config(cfg, world_size=1))
        assert ds["bf16"]["enabled"] and ds["data_types"]["grad_accum_dtype"] == "fp32"
        assert ds["gradient_accumulation_steps"] == cfg.train.global_batch_size // cfg.train.micro_batch_size
    fp32 = load_config("configs/tiny-sink.yaml")
    assert "data_types" not in deepspeed_config(fp32, ParallelDims.from_config(fp32, world_size=1))


def test_bf16_accumulation_without_zero_is_refused_by_name():
    cfg = load_config("configs/tiny-sink.yaml", ["train.precision=bf16", "parallel.zero_stage=0",
                                                 "train.micro_batch_size=2", "train.global_batch_size=4"])
    with pytest.raises(ConfigError, match="bf16 with gradient accumulation .2 micro-batches per step. needs "
                                          "parallel.zero_stage >= 1"):
        ParallelDims.from_config(cfg, world_size=1)
    ParallelDims.from_config(cfg, world_size=2)  # one micro-batch per rank: nothing accumulates


def test_adamw_step_state_lives_where_torch_reads_it():
    """Fused (and capturable) AdamW reads state["step"] on the parameter's device: a CPU step tensor
    crashes _fused_adamw on CUDA at the first step after a resume. Otherwise a CPU scalar."""
    p = torch.empty(3, device="meta")
    assert step_state(5, {"fused": True}, p).device.type == "meta"
    assert step_state(5, {"capturable": True}, p).device.type == "meta"
    on_cpu = step_state(5, {"fused": None, "capturable": False}, p)
    assert on_cpu.device.type == "cpu" and on_cpu.item() == 5.0 and on_cpu.dtype == torch.float32
    # the same rule torch applies itself when it creates the state (a CPU fused optimizer here)
    w = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([w], fused=True)
    w.grad = torch.randn(3)
    opt.step()
    torch_step = opt.state[w]["step"]
    ours = step_state(1, opt.param_groups[0], w)
    assert (ours.device, ours.dtype, ours.item()) == (torch_step.device, torch_step.dtype, torch_step.item())


@pytest.mark.parametrize("T", [16, 13])
def test_sdpa_bias_for_cuda_efficient_attention(T):
    """The sdpa route's CUDA mask: (B, H, T, T) (the kernel checks the bias's head dim), rows
    stored at a multiple of 8 (it checks alignment), the same values as the (B, 1, T, T) mask."""
    from megasink.model.kernels import SeqInfo
    from megasink.model.kernels.sdpa import efficient_attention_bias

    doc = torch.zeros(2, T, dtype=torch.long)
    doc[:, 5:] = 1
    mask = SeqInfo.build(doc, doc).additive_mask(torch.float32)  # (B, 1, T, T)
    bias = efficient_attention_bias(mask, n_heads=4)
    assert bias.shape == (2, 4, T, T) and bias.stride(-2) % 8 == 0 and bias.stride(1) == 0
    assert torch.equal(bias, mask.expand(2, 4, T, T))


def _built_parameters(rank, world_size, zero, precision, two_groups):
    """Build the 0.6b sink recipe (10 heads: 20-byte sink logits in bf16) through the real engine;
    -> (names of block parameters off a 16-byte boundary, the compile check's error or None)."""
    import megasink.parallel.engine as engine
    from megasink.parallel.dims import init_distributed, teardown_distributed
    from megasink.parallel.parallelize import check_aligned_parameters
    from megasink.train.main import build_everything

    if two_groups:  # the grouping before parameters were aligned: decay / no decay only
        def two(model, weight_decay):
            groups = [{"params": [], "weight_decay": weight_decay}, {"params": [], "weight_decay": 0.0}]
            for name, p in model.named_parameters():
                groups[p.dim() < 2 or name.endswith(engine.NO_DECAY_SUFFIXES)]["params"].append(p)
            return groups
        engine.param_groups = two
    cfg = load_config("configs/0.6b-sink.yaml", [
        "model.n_layers=3", "model.d_model=320", "model.vocab_size=512", "model.seq_len=32", "data.path=synthetic",
        "data.tokenizer=", "train.micro_batch_size=1", "train.global_batch_size=1", f"parallel.zero_stage={zero}",
        f"train.precision={precision}", "train.activation_checkpointing=false", "train.resume=none",
        f"run_dir={os.environ['MEGASINK_TEST_RUN_DIR']}"])
    dims = init_distributed(cfg, "test")
    model = build_everything(cfg, dims).pm.engine.module
    bad = [n for n, p in model.named_parameters() if p.data_ptr() % 16]
    try:
        check_aligned_parameters(model)
        error = None
    except RuntimeError as e:
        error = str(e)
    teardown_distributed()
    return bad, error


@pytest.mark.parametrize("zero,precision", [(1, "bf16"), (2, "fp32")])
def test_every_parameter_starts_16_byte_aligned(zero, precision, tmp_path, monkeypatch):
    """DeepSpeed makes parameters views into one flat buffer per group (BF16_Optimizer for bf16
    ZeRO-1, its ZeRO optimizer for ZeRO-1/2 otherwise). A compiled block keeps the alignment of
    the first block's parameters and faults on a later block's that is off it (seen on an H200:
    'misaligned address' at the first compiled step), so every parameter must start on a 16-byte
    boundary; with the old two groups the 10 sink logits shift the rest, and the check says so."""
    from dist_utils import run_distributed

    monkeypatch.setenv("MEGASINK_TEST_RUN_DIR", str(tmp_path / "run"))
    bad, error = run_distributed(_built_parameters, 1, zero, precision, False)[0]
    assert bad == [] and error is None
    bad, error = run_distributed(_built_parameters, 1, zero, precision, True)[0]
    assert any(n.startswith("layers.1.") for n in bad), bad
    assert error is not None and "do not start on a 16-byte boundary" in error
