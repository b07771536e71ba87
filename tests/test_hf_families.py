"""The Hugging Face families people fine-tune, against transformers' own models: Llama 3.x (llama3 and
linear RoPE scaling, tied embeddings), Qwen2/2.5 (q/k/v biases), Qwen3 (per-head q/k RMSNorm, explicit
head_dim), Mistral (sliding window, accepted while model.seq_len fits in it). Import, export back (the
family's own class for vanilla, remote code for sink/gated), generation, refusals."""
import dataclasses
import json

import pytest
import torch

from megasink import load_checkpoint
from megasink.checkpoint import save_model_checkpoint
from megasink.config import AuxLossConfig, ConfigError, ModelConfig, validate_model
from megasink.hf import import_model
from megasink.hf.cli import from_hf_main, to_hf_main
from megasink.hf.mapping import ARCHITECTURES
from megasink.model.transformer import Transformer
from test_hf_helpers import FAMILY_NAMES, MODEL_VOCAB, family_config, save_family

transformers = pytest.importorskip("transformers")
AutoModelForCausalLM = transformers.AutoModelForCausalLM

EXPECTED = {  # family -> megasink config fields the import must produce
    "llama3": dict(hf_family="llama", rope_scaling="llama3", rope_factor=8.0, rope_theta=500000.0,
                   rope_original_seq_len=32, tie_embeddings=True),
    "llama-linear": dict(hf_family="llama", rope_scaling="linear", rope_factor=4.0, tie_embeddings=False),
    "qwen2": dict(hf_family="qwen2", qkv_bias=True, tie_embeddings=True),
    "qwen3": dict(hf_family="qwen3", qk_norm=True, d_head=24, head_dim=24),
    "mistral": dict(hf_family="mistral", sliding_window=48, seq_len=48),
}
FEATURE_OFF = {  # overrides that drop each family's feature: the logits must then move (the test sees it)
    "llama3": dict(rope_scaling="none"),
    "llama-linear": dict(rope_scaling="none"),
    "qwen2": dict(qkv_bias=False, hf_family="llama"),
    "qwen3": dict(qk_norm=False, hf_family="llama"),
}


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request, tmp_path_factory):
    """(family name, HF directory, the transformers model loaded from it)."""
    name = request.param
    hf_dir = save_family(name, tmp_path_factory.mktemp(name) / "hf")
    return name, hf_dir, AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()


def _tokens(seq_len: int, rows: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, MODEL_VOCAB, (rows, min(seq_len, 40)), generator=torch.Generator().manual_seed(seed))


def _load_hf(hf_dir, variant, **kw):
    return AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=variant != "vanilla", **kw).eval()


@pytest.mark.parametrize("variant", ["vanilla", "sink", "gated"])
def test_import_matches_transformers(family, variant):
    """vanilla and gated (gates 1/2, wo doubled): transformers' logits within 1e-4; sink: within the
    sink's 1e-3 share. Dropping the family's feature moves the logits far beyond that."""
    name, hf_dir, hf = family
    model, cfg, _ = import_model(hf_dir, attention=variant, progress=False)
    for key, value in EXPECTED[name].items():
        assert getattr(cfg.model, key) == value, key
    tokens = _tokens(cfg.model.seq_len)
    with torch.no_grad():
        ref = hf(tokens).logits
        err = (model(tokens).logits - ref).abs().max().item()
    assert err <= (1e-3 * ref.abs().max().item() if variant == "sink" else 1e-4), err
    if variant == "vanilla" and name in FEATURE_OFF:
        off = Transformer(dataclasses.replace(cfg.model, **FEATURE_OFF[name]))
        off.load_state_dict(model.state_dict(), strict=False)
        with torch.no_grad():
            assert (off(tokens).logits - ref).abs().max() > 1e-2


@pytest.mark.parametrize("variant", ["vanilla", "sink", "gated"])
def test_export_back_same_architecture(family, variant, tmp_path):
    """import -> one AdamW step (every bias, norm, sink and gate moves) -> export: vanilla is the
    family's own transformers class, sink/gated megasink's remote code; logits within 1e-4 (eager and
    sdpa); importing the export gives the same weights and config, bit for bit."""
    name, hf_dir, _ = family
    model, cfg, _ = import_model(hf_dir, attention=variant, progress=False)
    trained = Transformer(cfg.model, AuxLossConfig(coef=1e-2))
    trained.load_state_dict(model.state_dict())
    tokens = _tokens(cfg.model.seq_len, rows=4)
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    out = trained(tokens, targets=tokens.roll(-1, 1))
    (out.loss + out.aux_loss).backward()
    opt.step()
    ckpt = save_model_checkpoint(trained, cfg, tmp_path / "ckpt")
    assert to_hf_main([str(ckpt), str(tmp_path / "hf"), "--no-progress"]) == 0
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    expected_class = ARCHITECTURES[cfg.model.hf_family] if variant == "vanilla" else "MegasinkForCausalLM"
    assert hf_cfg["architectures"] == [expected_class]
    with torch.no_grad():
        ref = trained(tokens).logits
        assert (ref - model(tokens).logits).abs().max() > 1e-3  # the step changed the model
        for impl in ("eager", "sdpa"):
            hf = _load_hf(tmp_path / "hf", variant, attn_implementation=impl)
            assert type(hf).__name__ == expected_class
            err = (hf(tokens).logits - ref).abs().max().item()
            assert err <= 1e-4, (impl, err)
    assert from_hf_main([str(tmp_path / "hf"), str(tmp_path / "back"), "--no-progress"]) == 0
    back, back_cfg = load_checkpoint(tmp_path / "back")
    assert back_cfg.model == cfg.model
    sd, back_sd = trained.state_dict(), back.state_dict()
    assert sd.keys() == back_sd.keys()
    assert all(torch.equal(sd[k], back_sd[k]) for k in sd)


@pytest.mark.parametrize("name,variant", [("qwen3", "sink"), ("qwen2", "gated"), ("llama3", "gated")])
def test_remote_code_generates_with_kv_cache(name, variant, tmp_path):
    """The remote code's biases, q/k norms and scaled RoPE through a KV cache: cached, uncached and
    megasink's own greedy decoding agree."""
    model, cfg, _ = import_model(save_family(name, tmp_path / "src"), attention=variant, progress=False)
    ckpt = save_model_checkpoint(model, cfg, tmp_path / "ckpt")
    assert to_hf_main([str(ckpt), str(tmp_path / "hf"), "--no-progress"]) == 0
    hf = _load_hf(tmp_path / "hf", variant)
    prompt = _tokens(cfg.model.seq_len, rows=1)[:, :12]
    kw = dict(max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    cached, uncached = hf.generate(prompt, use_cache=True, **kw), hf.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    seq = prompt
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(seq, cached)


def test_rope_frequencies_equal_transformers():
    """megasink's scaled inverse frequencies are transformers' own, bit for bit."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megasink.model.layers import RotaryEmbedding

    for name in ("llama3", "llama-linear"):
        _, hf_cfg = family_config(name)
        m = ModelConfig(d_model=64, n_heads=4, **{k: v for k, v in EXPECTED[name].items() if k.startswith("rope")},
                        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0)
        theirs, scaling = ROPE_INIT_FUNCTIONS[m.rope_scaling](hf_cfg, "cpu")
        assert scaling == 1.0 and torch.equal(RotaryEmbedding.from_config(m).inv_freq, theirs), name
        assert not torch.equal(RotaryEmbedding(m.head_dim, m.rope_theta).inv_freq, theirs)  # the scaling matters


def test_hub_style_rope_scaling_config(tmp_path):
    """Llama 3.1 files on the Hub carry "rope_scaling" and a top-level "rope_theta" (transformers 4.x):
    the same model as rope_parameters, for megasink and for transformers."""
    hf_dir = save_family("llama3", tmp_path / "hf")
    path = hf_dir / "config.json"
    hf_cfg = json.loads(path.read_text())
    rope = hf_cfg.pop("rope_parameters")
    hf_cfg["rope_theta"] = rope.pop("rope_theta")
    hf_cfg["rope_scaling"] = rope
    path.write_text(json.dumps(hf_cfg))
    model, cfg, _ = import_model(hf_dir, progress=False)
    for key, value in EXPECTED["llama3"].items():
        assert getattr(cfg.model, key) == value, key
    tokens = _tokens(cfg.model.seq_len)
    with torch.no_grad():
        assert (model(tokens).logits - _load_hf(hf_dir, "vanilla")(tokens).logits).abs().max() <= 1e-4


def test_sliding_window_only_within_the_window(tmp_path, capsys):
    """Mistral's window: seq_len defaults to it (with a note); documents longer than it are refused by the
    model and by the remote code; packed rows of documents that fit match transformers document by
    document; a config with seq_len beyond the window does not validate."""
    hf_dir = save_family("mistral", tmp_path / "hf")
    assert from_hf_main([str(hf_dir), str(tmp_path / "ckpt"), "--attention", "sink", "--no-progress"]) == 0
    assert "model.seq_len set to 48, the sliding window" in capsys.readouterr().out
    model, cfg = load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="a document of 49 tokens exceeds model.sliding_window=48"):
        model(torch.zeros(1, 49, dtype=torch.long))
    tokens = _tokens(48, rows=1, seed=5).repeat(1, 3)[:, :96]  # (1, 96): two documents of 48
    doc_ids = torch.arange(96)[None] // 48
    with torch.no_grad():
        packed = model(tokens, doc_ids).logits
        alone = torch.cat([model(tokens[:, :48]).logits, model(tokens[:, 48:]).logits], dim=1)
    assert (packed - alone).abs().max() <= 1e-5
    with pytest.raises(ConfigError, match="model.seq_len=64 exceeds model.sliding_window=48"):
        validate_model(dataclasses.replace(cfg.model, seq_len=64))
    assert to_hf_main([str(tmp_path / "ckpt"), str(tmp_path / "hf_out"), "--no-progress"]) == 0
    hf = _load_hf(tmp_path / "hf_out", "sink")
    with torch.no_grad():
        assert (hf(tokens[:, :48]).logits - alone[:, :48]).abs().max() <= 1e-4
        with pytest.raises(ValueError, match="a context of 49 tokens exceeds sliding_window=48"):
            hf(tokens[:, :49])


def test_family_features_are_one_config_value_each():
    """Each feature belongs to its family (so a vanilla export is that family's stock model), and every
    refusal names the key and the allowed values."""
    ok = ModelConfig(d_model=64, n_heads=4, seq_len=32)
    cases = {
        "model.qkv_bias=True with model.hf_family=llama": dict(qkv_bias=True),
        "model.qkv_bias=False with model.hf_family=qwen2": dict(hf_family="qwen2"),
        "model.qk_norm=True with model.hf_family=qwen2": dict(hf_family="qwen2", qkv_bias=True, qk_norm=True),
        "model.sliding_window=16 needs model.hf_family=mistral": dict(sliding_window=16),
        "model.seq_len=32 exceeds model.sliding_window=16": dict(sliding_window=16, hf_family="mistral"),
        "model.hf_family = 'gemma' is not one of llama, mistral, qwen2, qwen3": dict(hf_family="gemma"),
        "model.rope_scaling = 'yarn' is not one of none, linear, llama3": dict(rope_scaling="yarn"),
        "rope_low_freq_factor": dict(rope_scaling="llama3", rope_low_freq_factor=4.0),
        "model.rope_factor must be > 0": dict(rope_scaling="linear", rope_factor=0.0),
        r"head_dim=15 \(model.d_head": dict(d_head=15),
        "set model.d_head": dict(d_model=66),
    }
    for message, overrides in cases.items():
        with pytest.raises(ConfigError, match=message):
            validate_model(dataclasses.replace(ok, **overrides))
    validate_model(dataclasses.replace(ok, d_model=66, d_head=16))  # head_dim given: d_model need not divide


def test_conversion_states_absolute_and_relative_logit_change(tmp_path, capsys):
    """The converter prints the added sinks' logit change absolute and relative to the largest |logit| of
    the model without them, on the calibration tokens (the tokens named in the message)."""
    from megasink.hf.cli import logit_change

    hf_dir = save_family("qwen2", tmp_path / "hf")
    _, _, report = import_model(hf_dir, attention="sink", progress=False)
    assert 0 < report.max_logit_change < 1e-3 * report.max_logit
    assert from_hf_main([str(hf_dir), str(tmp_path / "ckpt"), "--attention", "sink", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert logit_change(report) in out
    assert (f"largest logit change {report.max_logit_change:.3g} absolute, "
            f"{report.max_logit_change / report.max_logit:.2g} relative to the largest |logit|") in out
