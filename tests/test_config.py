import pytest
import yaml

from megasink.config import ConfigError, load_config


def test_tiny_configs_load(tmp_path):
    for v in ("vanilla", "sink", "gated"):
        cfg = load_config(f"configs/tiny-{v}.yaml")
        assert cfg.model.attention == v
    for size in ("0.6b", "1b", "2b"):
        cfg = load_config(f"configs/{size}-sink.yaml")
        assert cfg.model.n_heads % cfg.model.kv_heads == 0
    paper = load_config("configs/0.6b-sink.yaml").model
    assert (paper.n_layers, paper.n_heads, paper.d_model) == (20, 10, 1280)


def test_overrides_convert_types():
    cfg = load_config("configs/tiny-sink.yaml", ["model.n_layers=2", "aux_loss.coef=0.5", "train.progress=false",
                                                 "data.path=[a, b]", "aux_loss.shared_heads=2"])
    assert cfg.model.n_layers == 2 and cfg.aux_loss.coef == 0.5 and cfg.train.progress is False
    assert cfg.data.path == ["a", "b"] and cfg.aux_loss.shared_heads == 2


def _write(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_unknown_key_names_key_and_file(tmp_path):
    p = _write(tmp_path, {"model": {"n_layrs": 2}})
    with pytest.raises(ConfigError, match=r"c\.yaml.*unknown key 'model\.n_layrs'"):
        load_config(p)
    with pytest.raises(ConfigError, match="unknown key 'train.stepz'"):
        load_config("configs/tiny-sink.yaml", ["train.stepz=3"])


def test_wrong_type_named(tmp_path):
    with pytest.raises(ConfigError, match="'model.n_heads' must be int"):
        load_config(_write(tmp_path, {"model": {"n_heads": "many"}}))


def test_heads_not_divisible_by_kv_heads(tmp_path):
    with pytest.raises(ConfigError, match="n_heads=6 is not divisible by model.n_kv_heads=4"):
        load_config(_write(tmp_path, {"model": {"n_heads": 6, "n_kv_heads": 4, "d_model": 96}}))


def test_unknown_variant(tmp_path):
    with pytest.raises(ConfigError, match="model.attention = 'softmax' is not one of vanilla, sink, gated"):
        load_config(_write(tmp_path, {"model": {"attention": "softmax"}}))


def test_heads_not_divisible_by_tp():
    with pytest.raises(ConfigError, match="n_heads=10 is not divisible by parallel.tp=4"):
        load_config("configs/0.6b-sink.yaml", ["parallel.tp=4"])


def test_pipeline_constraints_named():
    with pytest.raises(ConfigError, match="parallel.pp=2 needs parallel.zero_stage 0 or 1"):
        load_config("configs/tiny-sink.yaml", ["parallel.pp=2", "parallel.zero_stage=2"])
    with pytest.raises(ConfigError, match="parallel.pp=2 with parallel.zero_stage=0 clips gradients per stage"):
        load_config("configs/tiny-sink.yaml", ["parallel.pp=2", "parallel.zero_stage=0"])  # explicit 0
    assert load_config("configs/tiny-sink.yaml", ["parallel.pp=2", "parallel.zero_stage=0",
                                                  "train.grad_clip=0"]).parallel.zero == 0


def test_zero_stage_default_follows_the_pipeline():
    # the README's pipeline example runs as written: ZeRO-1 unless a stage is given
    readme = open("README.md").read()
    line = next(ln for ln in readme.splitlines() if ln.startswith("torchrun") and "parallel.pp=2" in ln)
    config, *overrides = line.split("-m megasink.train ")[1].split()
    assert "parallel.zero_stage" not in line
    assert load_config(config, overrides).parallel.zero == 1
    assert load_config(config, [o for o in overrides if "pp=" not in o]).parallel.zero == 0
    assert load_config(config, overrides + ["parallel.zero_stage=1"]).parallel.zero == 1


@pytest.mark.parametrize("override,message", [
    ("train.steps=-3", "train.steps must be positive, got -3"),
    ("train.steps=0", "train.steps must be positive, got 0"),
    ("train.log_interval=0", "train.log_interval must be positive"),
    ("train.save_interval=-1", "train.save_interval must be >= 0, got -1"),
])
def test_counts_out_of_range_are_refused_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny-sink.yaml", [override])


def test_unknown_command_is_named(capsys):
    from megasink.cli import main

    assert main(["foo"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith("megasink: unknown command 'foo' (commands: train")
    assert main(["--help"]) == 0 and "usage: megasink" in capsys.readouterr().out


def test_shared_heads_both_forms_need_two_routed_heads(tmp_path):
    """A count and an importance.json are held to the same rule (>= 2 routed heads per layer)."""
    import json

    base = ["model.n_layers=2", "model.n_heads=4"]
    assert load_config("configs/tiny-sink.yaml", base + ["aux_loss.shared_heads=2"]).aux_loss.shared_heads == 2
    with pytest.raises(ConfigError, match="aux_loss.shared_heads=3 must leave at least 2 routed"):
        load_config("configs/tiny-sink.yaml", base + ["aux_loss.shared_heads=3"])
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"shared_heads": [[0, 1], [3, 2]]}))
    bad.write_text(json.dumps({"shared_heads": [[0, 1], [0, 1, 2]]}))
    assert load_config("configs/tiny-sink.yaml", base + [f"aux_loss.shared_heads={good}"])
    with pytest.raises(ConfigError, match=r"aux_loss.shared_heads: .*bad\.json.*layer\(s\) \[1\].*at least 2 routed"):
        load_config("configs/tiny-sink.yaml", base + [f"aux_loss.shared_heads={bad}"])


def test_llama3_8b_finetune_configs_describe_llama_3_1_8b():
    """configs/finetune-llama3-8b-*.yaml: Llama 3.1 8B's shape (8.03 B parameters, the count
    slurm/README.md's memory arithmetic uses), valid on 8 ranks as ZeRO-3 and as tp 8."""
    import torch

    import megasink
    from megasink.parallel.dims import ParallelDims

    for variant, extra in (("sink", 1024), ("gated", 32 * 32 * 4096 + 32 * 32)):
        cfg = load_config(f"configs/finetune-llama3-8b-{variant}.yaml")
        m = cfg.model
        assert (m.rope_scaling, m.rope_factor, m.rope_theta, m.vocab_size) == ("llama3", 8.0, 500000.0, 128256)
        assert cfg.aux_loss.coef == 1e-2 and cfg.train.precision == "bf16" and cfg.train.activation_checkpointing
        with torch.device("meta"):
            n = sum(p.numel() for p in megasink.build_model(m).parameters())
        assert n == 8_030_261_248 + extra
        assert ParallelDims.from_config(cfg, 8).dp == 8
        tp8 = load_config(f"configs/finetune-llama3-8b-{variant}.yaml", ["parallel.tp=8", "parallel.zero_stage=1"])
        assert ParallelDims.from_config(tp8, 8).tp == 8
