"""HF export / import: megasink -> HF -> megasink round trips, logits parity with transformers,
generation with the exported tokenizer and KV cache, importing Llama-family models (optionally
adding sinks or gates that keep the function), and clear refusals of unsupported features."""
import json
from pathlib import Path

import pytest
import torch

from conftest import build_seeded, small_model_cfg
import megasink
from megasink import load_checkpoint
from megasink.config import AuxLossConfig, Config
from megasink.hf import UnsupportedModelError, import_model, mapping
from megasink.hf.cli import from_hf_main, to_hf_main
from megasink.checkpoint import save_model_checkpoint
from test_hf_helpers import MODEL_VOCAB, save_random_hf, tiny_llama_config, train_spm

transformers = pytest.importorskip("transformers")
AutoModelForCausalLM, AutoTokenizer = transformers.AutoModelForCausalLM, transformers.AutoTokenizer


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    return train_spm(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module", params=["vanilla", "sink", "gated"])
def exported(request, tmp_path_factory, spm_path):
    """(variant, megasink model, cfg, checkpoint dir, HF dir) for each variant; sink has tied embeddings."""
    variant = request.param
    root = tmp_path_factory.mktemp(f"export_{variant}")
    cfg = Config(model=small_model_cfg(variant, vocab_size=MODEL_VOCAB, tie_embeddings=variant == "sink"))
    model = build_seeded(cfg.model)
    model.shared_heads[1, 2] = True  # a fine-tuning buffer that must survive the round trip
    ckpt = save_model_checkpoint(model, cfg, root / "step_1", tokenizer=str(spm_path))
    assert to_hf_main([str(ckpt), str(root / "hf"), "--no-progress"]) == 0
    return variant, model, cfg, ckpt, root / "hf"


def _load_hf(hf_dir, variant, **kw):
    return AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=variant != "vanilla", **kw).eval()


def test_export_layout_and_logits(exported):
    variant, model, cfg, _, hf_dir = exported
    files = {p.name for p in hf_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "megasink.json"} <= files
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    if variant == "vanilla":
        assert hf_cfg["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in hf_cfg
        assert not any(name.endswith(".py") for name in files)
    else:
        assert hf_cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_megasink.MegasinkForCausalLM"
        assert {"configuration_megasink.py", "modeling_megasink.py"} <= files
    tokens = torch.randint(0, MODEL_VOCAB, (2, cfg.model.seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(tokens).logits
        for impl in ("eager", "sdpa"):
            hf = _load_hf(hf_dir, variant, attn_implementation=impl)
            if variant == "vanilla":
                assert type(hf).__name__ == "LlamaForCausalLM"
            err = (hf(tokens).logits - ref).abs().max().item()
            assert err <= 1e-4, (impl, err)


def test_round_trip_identical_weights(exported, tmp_path):
    variant, model, cfg, _, hf_dir = exported
    assert from_hf_main([str(hf_dir), str(tmp_path / "back"), "--no-progress"]) == 0
    back, back_cfg = load_checkpoint(tmp_path / "back")
    assert back_cfg == cfg  # the exact config, from megasink.json
    sd, back_sd = model.state_dict(), back.state_dict()
    assert sd.keys() == back_sd.keys()
    for k in sd:
        assert torch.equal(sd[k], back_sd[k]), k
    assert (tmp_path / "back" / "tokenizer.model").is_file()


def test_generate_with_exported_tokenizer_and_kv_cache(exported, spm_path):
    import sentencepiece as spm

    variant, model, _, _, hf_dir = exported
    tok = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=variant != "vanilla")
    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    text = "Return a list of the words in the string, using sep as the delimiter."
    assert tok(text)["input_ids"] == sp.encode(text)  # same ids as training data, no BOS added
    hf = _load_hf(hf_dir, variant)
    prompt = tok(text, return_tensors="pt")["input_ids"][:, :12]
    kw = dict(max_new_tokens=10, do_sample=False, return_dict_in_generate=True, output_scores=True,
              eos_token_id=None)
    cached = hf.generate(prompt, use_cache=True, **kw)
    uncached = hf.generate(prompt, use_cache=False, **kw)
    static = hf.generate(prompt, cache_implementation="static", **kw)  # masks of another shape
    for other in (uncached, static):
        assert torch.equal(cached.sequences, other.sequences)
        for a, b in zip(cached.scores, other.scores):
            assert (a - b).abs().max() < 1e-4
    # megasink's own greedy decoding agrees
    seq = prompt
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(seq, cached.sequences)
    assert isinstance(tok.decode(cached.sequences[0]), str) and tok.decode(cached.sequences[0]).startswith("Return")
    # batched, left-padded prompts: the attention mask reaches the sink / gated attention correctly
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    texts = [text, "The quick brown fox"]
    batch = tok(texts, return_tensors="pt", padding=True)
    out = hf.generate(**batch, max_new_tokens=6, do_sample=False, eos_token_id=None)
    for i, t in enumerate(texts):
        single = hf.generate(tok(t, return_tensors="pt")["input_ids"], max_new_tokens=6, do_sample=False,
                             eos_token_id=None)
        assert torch.equal(out[i, -6:], single[0, -6:])


def test_sharded_export_loads(tmp_path, capsys):
    cfg = Config(model=small_model_cfg("gated", vocab_size=MODEL_VOCAB))
    model = build_seeded(cfg.model)
    ckpt = save_model_checkpoint(model, cfg, tmp_path / "ckpt")
    assert to_hf_main([str(ckpt), str(tmp_path / "hf"), "--max-shard-size", "40KB", "--no-progress",
                       "--dtype", "float32"]) == 0
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    hf = _load_hf(tmp_path / "hf", "gated")
    tokens = torch.randint(0, MODEL_VOCAB, (1, 16))
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens).logits).abs().max() <= 1e-4
    back, _, _ = import_model(tmp_path / "hf", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    assert to_hf_main([str(ckpt), str(tmp_path / "hf"), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("attention", ["vanilla", "sink", "gated"])
def test_llama_import_train_step_export_reload(attention, tmp_path):
    """HF Llama (random config) -> megasink (optionally adding sinks / gates) -> one AdamW step -> HF."""
    hf_src = save_random_hf(transformers.LlamaForCausalLM, tiny_llama_config(), tmp_path / "llama")
    src = AutoModelForCausalLM.from_pretrained(str(hf_src)).eval()
    argv = [str(hf_src), str(tmp_path / "ms"), "--tp", "2", "--pp", "2", "--no-progress"]
    if attention != "vanilla":
        argv += ["--attention", attention]
    assert from_hf_main(argv) == 0
    model, cfg = load_checkpoint(tmp_path / "ms")
    assert (cfg.model.attention, cfg.parallel.tp, cfg.parallel.pp) == (attention, 2, 2)
    assert cfg.model.d_ff == 96 and cfg.model.kv_heads == 2 and cfg.model.norm_eps == 1e-5
    tokens = torch.randint(0, MODEL_VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # the same function at the start: gates exactly, sinks within their 1e-3 share
        ref = src(tokens).logits
        tol = 1e-3 * ref.abs().max().item() if attention == "sink" else 1e-4
        assert (model(tokens).logits - ref).abs().max() <= tol
    if attention == "gated":
        assert cfg.model.gate_bias_init == 0.0

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = model(tokens, targets=tokens.roll(-1, 1))
    (out.loss + out.aux_loss).backward()
    opt.step()
    save_model_checkpoint(model, cfg, tmp_path / "trained")
    assert to_hf_main([str(tmp_path / "trained"), str(tmp_path / "hf_out"), "--no-progress"]) == 0
    hf = _load_hf(tmp_path / "hf_out", attention)
    with torch.no_grad():
        ref = model(tokens).logits
        assert (ref - src(tokens).logits).abs().max() > 1e-3  # the step changed the model
        assert (hf(tokens).logits - ref).abs().max() <= 1e-4


def test_added_sinks_and_gates_change_the_function_by_the_stated_amount(tmp_path):
    """Sinks take at most max_sink_weight (1e-3) of any head's attention on the calibration tokens
    (each head reaches it); gates start at 1/2 with wo doubled, which is the same function exactly."""
    from megasink.hf.importer import MAX_SINK_WEIGHT, min_gates

    hf_src = save_random_hf(transformers.LlamaForCausalLM, tiny_llama_config(), tmp_path / "llama")
    src = AutoModelForCausalLM.from_pretrained(str(hf_src)).eval()
    tokens = torch.randint(0, MODEL_VOCAB, (2, 32), generator=torch.Generator().manual_seed(3))
    model, _, report = import_model(hf_src, attention="sink", progress=False)
    assert report.max_sink_weight == pytest.approx(MAX_SINK_WEIGHT, rel=1e-3)
    share = 1 - min_gates(model)  # (L, H): every head's sink is placed at the limit, not just one
    assert torch.allclose(share, torch.full_like(share, MAX_SINK_WEIGHT), rtol=1e-3)
    with torch.no_grad():
        ref = src(tokens).logits
        change = (model(tokens).logits - ref).abs().max().item()
    assert 0 < change <= MAX_SINK_WEIGHT * ref.abs().max().item()
    gated, _, report = import_model(hf_src, attention="gated", progress=False)
    assert report.min_gate == 0.5 and report.max_logit_change <= 1e-5
    with torch.no_grad():
        assert (gated(tokens).logits - ref).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="Leave out --sink-init .* or use a lower one"):
        import_model(hf_src, attention="sink", sink_init=-3.0, progress=False)
    _, _, report = import_model(hf_src, attention="sink", sink_init=-40.0, progress=False)
    assert report.max_sink_weight < 1e-6


@pytest.mark.parametrize("attention", ["sink", "gated"])
def test_added_sinks_and_gates_train(attention, tmp_path):
    """A few AdamW steps of LM + aux loss move every added sink / gate bias. Adam's first step moves a
    parameter by lr * |g| / (|g| + eps): at least 0.9 lr when its gradient is above 9 eps (at the old
    inits, -30 and +15, the gradients were 0 and 5e-10: nothing moved)."""
    hf_src = save_random_hf(transformers.LlamaForCausalLM, tiny_llama_config(), tmp_path / "llama")
    imported, cfg, _ = import_model(hf_src, attention=attention, progress=False)
    model = megasink.build_model(cfg.model, AuxLossConfig(coef=1e-2))  # the fine-tuning lambda
    model.load_state_dict(imported.state_dict())
    added = {n: p for n, p in model.named_parameters() if n.endswith(("sinks", "gate_bias"))}
    start = {n: p.detach().clone() for n, p in added.items()}
    lr = 1e-3
    opt = torch.optim.AdamW(added.values(), lr=lr, weight_decay=0.0)  # as the trainer: no decay on these
    tokens = torch.randint(0, MODEL_VOCAB, (4, 32), generator=torch.Generator().manual_seed(4))
    for step in range(3):
        out = model(tokens, targets=tokens.roll(-1, 1))
        opt.zero_grad()
        (out.loss + out.aux_loss).backward()
        opt.step()
        for n, p in added.items():
            moved = (p.detach() - start[n]).abs()
            assert moved.min() >= (0.9 * lr if step == 0 else 0.5 * lr), (step, n, moved.tolist())


def test_no_progress_bars_off_a_terminal(tmp_path, capsys):
    """Both converters draw progress bars only on a terminal (stderr is captured here)."""
    hf_src = save_random_hf(transformers.LlamaForCausalLM, tiny_llama_config(), tmp_path / "llama")
    assert from_hf_main([str(hf_src), str(tmp_path / "ms")]) == 0
    assert to_hf_main([str(tmp_path / "ms"), str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err
    assert "reading weights" not in err and "writing weights" not in err


def test_refuses_unsupported_checkpoints(tmp_path, capsys):
    """What megasink's model cannot represent is refused by name, before anything is written."""
    qwen3 = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, attention_bias=True)
    save_random_hf(transformers.Qwen3ForCausalLM, qwen3, tmp_path / "qwen3")
    assert from_hf_main([str(tmp_path / "qwen3"), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "attention_bias=true" in capsys.readouterr().err and not (tmp_path / "out").exists()
    llama = save_random_hf(transformers.LlamaForCausalLM, tiny_llama_config(), tmp_path / "llama")
    assert from_hf_main([str(llama), str(tmp_path / "out"), "--tp", "3", "--no-progress"]) == 2
    assert "not divisible by parallel.tp=3" in capsys.readouterr().err
    mistral = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, sliding_window=16)
    save_random_hf(transformers.MistralForCausalLM, mistral, tmp_path / "mistral")
    assert from_hf_main([str(tmp_path / "mistral"), str(tmp_path / "out"), "--seq-len", "32", "--no-progress"]) == 2
    assert "model.seq_len=32 exceeds model.sliding_window=16" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    base = tiny_llama_config().to_dict()
    qwen2 = {**base, "model_type": "qwen2"}
    cases = {
        "sliding-window attention on some layers": {**qwen2, "use_sliding_window": True, "sliding_window": 16},
        "RoPE type 'yarn'": {**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}},
        "RoPE type 'dynamic'": {**base, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
        "without its parameter 'low_freq_factor'": {**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
        "partial_rotary_factor": {**base, "partial_rotary_factor": 0.5},
        "hidden_act": {**base, "hidden_act": "gelu"},
        "mlp_bias": {**base, "mlp_bias": True},
        "attention_bias=true": {**base, "attention_bias": True},
        "model_type 'gpt2'": {**base, "model_type": "gpt2"},
    }
    for message, hf_cfg in cases.items():
        with pytest.raises(UnsupportedModelError, match=message):
            mapping.check_supported(hf_cfg, "config.json")
    for message, names in {"q/k/v biases in a llama checkpoint": ["model.layers.0.self_attn.k_proj.bias"],
                           r"QK-norm\) in a qwen2 checkpoint": ["model.layers.0.self_attn.q_norm.weight"],
                           "o_proj": ["model.layers.0.self_attn.o_proj.bias"]}.items():
        hf_cfg = qwen2 if "qwen2" in message else base
        with pytest.raises(UnsupportedModelError, match=message):
            mapping.check_supported(hf_cfg, "config.json", names)
    with pytest.raises(UnsupportedModelError, match="cannot become vanilla"):
        cfg = Config(model=small_model_cfg("gated", vocab_size=MODEL_VOCAB))
        ckpt = save_model_checkpoint(build_seeded(cfg.model), cfg, tmp_path / "g")
        to_hf_main([str(ckpt), str(tmp_path / "g_hf"), "--no-progress"])
        import_model(tmp_path / "g_hf", attention="vanilla", progress=False)


def test_scripts_run(monkeypatch, capsys):
    """The tools/ entry points parse their arguments and reach the library (in-process, no startup cost)."""
    import runpy

    for script in ("convert_to_hf.py", "convert_from_hf.py", "diagnose_heads.py"):
        monkeypatch.setattr("sys.argv", [script, "--help"])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(Path(__file__).parents[1] / "tools" / script), run_name="__main__")
        assert exit_info.value.code == 0 and "usage" in capsys.readouterr().out
