"""Head diagnosis: importance from megasink's flash gates equals transformers' eager attention
probabilities (vanilla) and the model's own forward (sink, gated); outputs and sampling; the
window defaults to the model's trained length; what auto means; one definition of dormant."""
import json

import numpy as np
import pytest
import torch

from conftest import build_seeded, small_model_cfg
from megasink.config import Config
from megasink.checkpoint import save_model_checkpoint
from megasink.data.documents import DocumentSource, iter_samples
from megasink.data.indexed import IndexedDatasetWriter
from megasink.eval.diagnose import diagnose, main, summary, write_outputs
from megasink.eval.inputs import HFEagerGates
from megasink.shared_heads import shared_mask_from_file
from test_hf_helpers import MODEL_VOCAB, save_random_hf, tiny_llama_config, train_spm

transformers = pytest.importorskip("transformers")

DOC_LENGTHS = [30, 7, 30, 50, 12, 30, 2, 40]  # truncated to SEQ_LEN=24: several equal lengths batch together
SEQ_LEN = 24


def write_indexed(prefix, lengths, vocab, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab, n) for n in lengths]
    w = IndexedDatasetWriter(prefix, np.uint16)
    for d in docs:
        w.add_document(d)
    w.finalize()
    w.commit()
    return docs


def eager_reference(hf_model, docs, seq_len):
    """Imp from transformers' eager attention probabilities: mean over t >= 1 of 1 - A[t, 0]."""
    sums, count = 0.0, 0
    with torch.no_grad():
        for d in docs:
            ids = torch.as_tensor(np.asarray(d[:seq_len], dtype=np.int64))[None]
            att = hf_model(ids, output_attentions=True).attentions  # L x (1, H, T, T)
            gates = torch.stack([1 - a[0, :, 1:, 0].double() for a in att])  # (L, H, T-1)
            sums = sums + gates.sum(-1)
            count += ids.shape[1] - 1
    return sums / count


def test_vanilla_importance_matches_transformers_eager(tmp_path):
    hf_dir = save_random_hf(transformers.LlamaForCausalLM, tiny_llama_config(), tmp_path / "llama", qk_scale=25.0)
    docs = write_indexed(tmp_path / "data", DOC_LENGTHS, MODEL_VOCAB)
    out = tmp_path / "diag"
    assert main([str(hf_dir), "--data", str(tmp_path / "data"), "--num-samples", "6", "--seq-len", str(SEQ_LEN),
                 "--out", str(out), "--top-m", "2", "--no-progress", "--max-batch-tokens", "64"]) == 0
    res = json.loads((out / "importance.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), attn_implementation="eager").eval()
    ref = eager_reference(hf, docs[:6], SEQ_LEN)
    imp = torch.tensor(res["importance"], dtype=torch.float64)
    assert (res["layers"], res["heads"]) == (2, 4) and res["num_samples"] == 6
    assert res["num_tokens"] == sum(min(n, SEQ_LEN) - 1 for n in DOC_LENGTHS[:6])
    assert (imp - ref).abs().max() <= 1e-5
    assert imp.std() > 1e-3  # heads differ (by ~100x the tolerance): the comparison is not vacuous
    for backend in ("sdpa", "eager"):  # the other kernels that return lse agree
        d = diagnose(str(hf_dir), [str(tmp_path / "data")], num_samples=6, seq_len=SEQ_LEN, backend=backend)
        assert (d.importance - ref).abs().max() <= 1e-5
    cv = imp.std(-1, unbiased=False) / imp.mean(-1)
    assert np.allclose(res["cv"], cv.tolist(), atol=1e-9)
    shared = shared_mask_from_file(out / "importance.json", 2, 4)
    assert shared.sum(-1).tolist() == [2, 2]
    assert torch.equal(shared, torch.zeros(2, 4, dtype=torch.bool).scatter(1, imp.topk(2, -1).indices, True))
    assert (out / "importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "verdict" in (out / "summary.txt").read_text()
    # the eager-probability fallback (for HF models megasink cannot represent) agrees as well
    fallback = HFEagerGates(hf)
    src = DocumentSource([str(tmp_path / "data")])
    total, n = 0.0, 0
    for tokens in iter_samples(src, 6, SEQ_LEN):
        s, c = fallback.gate_sums(torch.as_tensor(tokens)[None])
        total, n = total + s, n + c
    assert (total / n - ref).abs().max() <= 1e-6


@pytest.mark.parametrize("variant", ["sink", "gated"])
def test_sink_gated_importance_from_checkpoint_and_text(variant, tmp_path):
    """A megasink checkpoint with text input: importance is the token-weighted mean of the
    model's own per-document importance (documents encoded with the checkpoint's tokenizer + EOS)."""
    import sentencepiece as spm

    spm_path = train_spm(tmp_path / "spm")
    cfg = Config(model=small_model_cfg(variant, vocab_size=MODEL_VOCAB))
    model = build_seeded(cfg.model)
    ckpt = save_model_checkpoint(model, cfg, tmp_path / "step_1", tokenizer=str(spm_path))
    texts = ["Return the number of items in a container.", "", "Split the string at the last occurrence of sep.",
             "Open file and return a stream. Raise OSError upon failure.", "x" * 10]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    d = diagnose(str(ckpt), [str(tmp_path / "docs.jsonl")], num_samples=3, seq_len=12, top_m=1)
    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    sums, count = 0.0, 0
    with torch.no_grad():
        for t in [texts[0], texts[2], texts[3]]:  # the empty document is skipped
            ids = torch.tensor(sp.encode(t) + [sp.eos_id()])[:12][None]
            out = model(ids)
            sums, count = sums + out.gate_sums.double(), count + out.gate_count.item()
    assert d.num_samples == 3 and d.num_tokens == count == 36
    assert (d.importance - sums / count).abs().max() <= 1e-6
    assert d.shared_heads() == d.importance.argmax(-1)[:, None].tolist()
    if variant == "sink":  # parquet text input reads the same documents
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"body": texts}), tmp_path / "docs.parquet")
        d2 = diagnose(str(ckpt), [str(tmp_path / "docs.parquet")], num_samples=3, seq_len=12, text_key="body")
        assert torch.equal(d2.importance, d.importance)


def test_sampling_order_and_shuffle(tmp_path):
    docs = write_indexed(tmp_path / "a", [5, 0, 6, 7], 50)
    docs += write_indexed(tmp_path / "b", [8, 9], 50, seed=1)
    src = DocumentSource([str(tmp_path / "a"), str(tmp_path / "b.idx")])
    assert len(src) == 6
    in_order = [len(t) for t in iter_samples(src, 10, 100)]
    assert in_order == [5, 6, 7, 8, 9]  # the empty document is skipped
    assert [len(t) for t in iter_samples(src, 3, 6)] == [5, 6, 6]  # truncated to seq_len
    shuffled = [len(t) for t in iter_samples(src, 10, 100, shuffle_seed=3)]
    perm = np.random.default_rng(3).permutation(6)
    assert shuffled == [[5, 0, 6, 7, 8, 9][i] for i in perm if i != 1]
    first = next(iter_samples(src, 1, 100))
    assert np.array_equal(first, docs[0])
    with pytest.raises(FileNotFoundError, match="neither an indexed dataset"):
        DocumentSource([str(tmp_path / "missing")])


def test_unrepresentable_hf_model_uses_eager_fallback(tmp_path):
    qwen3 = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    hf_dir = save_random_hf(transformers.Qwen3ForCausalLM, qwen3, tmp_path / "qwen3")
    docs = write_indexed(tmp_path / "data", [10, 20, 20], 64)
    d = diagnose(str(hf_dir), [str(tmp_path / "data")], num_samples=3, seq_len=16)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), attn_implementation="eager").eval()
    assert (d.importance - eager_reference(hf, docs, 16)).abs().max() <= 1e-6


def test_top_m_must_leave_two_routed_heads(tmp_path):
    cfg = Config(model=small_model_cfg("sink", vocab_size=MODEL_VOCAB))  # 4 heads
    ckpt = save_model_checkpoint(build_seeded(cfg.model), cfg, tmp_path / "step_1")
    write_indexed(tmp_path / "data", [10, 12], MODEL_VOCAB)
    with pytest.raises(ValueError, match=r"--top-m 3 must be in \[0, 2\].*at least 2 routed"):
        diagnose(str(ckpt), [str(tmp_path / "data")], num_samples=2, seq_len=8, top_m=3)
    d = diagnose(str(ckpt), [str(tmp_path / "data")], num_samples=2, seq_len=8, top_m=2)
    out = write_outputs(d, tmp_path / "diag")
    assert shared_mask_from_file(out / "importance.json", 2, 4).sum(-1).tolist() == [2, 2]


def test_no_progress_bar_off_a_terminal(tmp_path, capsys):
    cfg = Config(model=small_model_cfg("sink", vocab_size=MODEL_VOCAB))
    ckpt = save_model_checkpoint(build_seeded(cfg.model), cfg, tmp_path / "step_1")
    write_indexed(tmp_path / "data", [10, 12], MODEL_VOCAB)
    assert main([str(ckpt), "--data", str(tmp_path / "data"), "--num-samples", "2", "--seq-len", "8",
                 "--out", str(tmp_path / "diag")]) == 0  # progress on, but stderr is captured
    assert "samples:" not in capsys.readouterr().err


def _sink_checkpoint(tmp_path, **model_kw):
    cfg = Config(model=small_model_cfg("sink", vocab_size=MODEL_VOCAB, **model_kw))  # seq_len 48
    model = build_seeded(cfg.model)
    return model, save_model_checkpoint(model, cfg, tmp_path / "step_1")


def test_seq_len_defaults_to_the_trained_length_and_longer_windows_warn(tmp_path, capsys):
    """Issue: --seq-len defaulted to 2048 whatever the model, silently changing the verdict."""
    from megasink.eval.inputs import default_seq_len, trained_length

    model, ckpt = _sink_checkpoint(tmp_path)
    write_indexed(tmp_path / "data", [100, 30, 70], MODEL_VOCAB)
    d = diagnose(str(ckpt), [str(tmp_path / "data")], num_samples=3)
    assert d.seq_len == 48 and d.trained_len == 48
    assert d.num_tokens == 48 + 30 + 48  # sink: every token counts; documents cut at the trained length
    assert "longer than" not in capsys.readouterr().err
    assert "the model was trained for 48" in summary(d)

    long = diagnose(str(ckpt), [str(tmp_path / "data")], num_samples=3, seq_len=80)
    err = capsys.readouterr().err
    assert "warning: 2 of 3 samples are longer than the 48 tokens the model was trained for" in err
    assert "leave --seq-len out" in err and "longer than the 48 the model was trained for" in summary(long)

    hf_dir = save_random_hf(transformers.LlamaForCausalLM, tiny_llama_config(), tmp_path / "llama")
    assert trained_length(hf_dir)[0] == default_seq_len(hf_dir) == 128  # max_position_embeddings
    big = save_random_hf(transformers.LlamaForCausalLM, tiny_llama_config(max_position_embeddings=131072),
                         tmp_path / "big")
    assert trained_length(big)[0] == 131072 and default_seq_len(big) == 4096  # capped as convert_from_hf.py
    mistral_cfg = transformers.MistralConfig(**{**tiny_llama_config().to_dict(), "sliding_window": 64})
    windowed = save_random_hf(transformers.MistralForCausalLM, mistral_cfg, tmp_path / "mistral")
    assert default_seq_len(windowed) == 64  # not beyond the window megasink's model refuses


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in ("(default: 500)", "(default: 16384)", "(default: auto)", "(default: text)", "(default: 0)",
                    "default: the length the model was trained for", "(default: the model's own)"):
        assert default in text, default
    assert "(default: None)" not in text and "(default: False)" not in text


def test_fewer_samples_than_asked_are_named(tmp_path, capsys):
    _, ckpt = _sink_checkpoint(tmp_path)
    write_indexed(tmp_path / "data", [10, 0, 12], MODEL_VOCAB)
    assert main([str(ckpt), "--data", str(tmp_path / "data"), "--num-samples", "5", "--out", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    assert "found 2 of the 5 samples asked for" in captured.err
    assert "data: 2 samples (found only 2 of the 5 asked for), <= 48 tokens each" in captured.out
    assert main([str(ckpt), "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "neither an indexed dataset" in err and "\n" not in err


def test_auto_backend_is_resolve_backends(tmp_path):
    """'auto' is the model's own resolve_backend everywhere; float32 on CUDA's varlen is refused by
    name; another backend is built into a new model (nothing set on the loaded one)."""
    from megasink.eval.inputs import check_route, forward_dtype, load_for_forward
    from megasink.model.kernels import resolve_backend

    for device in ("cpu", "cuda"):
        dtype = forward_dtype("auto", device)
        assert check_route("auto", device, dtype) == resolve_backend("auto", torch.device(device), False)
    assert forward_dtype("auto", "cuda") == "bfloat16" and forward_dtype("auto", "cpu") == "float32"
    with pytest.raises(ValueError, match=r"FlashAttention-2 \(varlen\).*--backend sdpa"):
        check_route("auto", "cuda", "float32")
    with pytest.raises(ValueError, match="--backend flash on cuda"):
        check_route("flash", "cuda", "bfloat16")

    model, ckpt = _sink_checkpoint(tmp_path)
    tokens = torch.randint(0, MODEL_VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    auto, eager = load_for_forward(ckpt, "cpu"), load_for_forward(ckpt, "cpu", backend="eager")
    assert auto.cfg.attention_backend == "auto" and eager.cfg.attention_backend == "eager"
    with torch.no_grad():
        ref = model(tokens)
        for m in (auto, eager):
            out = m(tokens)
            assert torch.allclose(out.logits, ref.logits, atol=1e-5)
            assert torch.allclose(out.gate_sums, ref.gate_sums, atol=1e-5)


def test_dormant_heads_are_the_heatmaps_definition(tmp_path):
    from megasink.eval.diagnose import Diagnosis
    from megasink.heatmap import DORMANT, dormant_count

    imp = torch.tensor([[0.5, 0.5, 0.5, 0.05], [0.9, 0.2, 0.2, 0.7]], dtype=torch.float64)  # 1 + 2 dormant
    d = Diagnosis("m", "sink", imp, 3, 30, 16)
    assert dormant_count(imp.tolist()) == 3
    assert f"dormant heads (importance < {DORMANT} x their layer's mean): 3 of 8" in summary(d)
    out = write_outputs(d, tmp_path / "diag")
    assert (out / "importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
