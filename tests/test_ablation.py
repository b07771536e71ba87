"""Head ablation: k = 0 is the plain validation loss on diagnosis' documents; a masked head's loss
equals a model copy with that head's columns of ``wo`` zeroed; orders come from diagnosis'
importance; an HF export gives the same curves; the CLI writes its outputs."""
import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import build_seeded, small_model_cfg
from data_fixtures import data_documents
from megasink.config import Config
from megasink.data.documents import DocumentSource, iter_samples
from megasink.eval.ablation import ablate, main, masked_heads, masking_orders
from megasink.eval.diagnose import diagnose
from megasink.hf.cli import to_hf_main
from megasink.checkpoint import save_model_checkpoint
from test_hf_helpers import MODEL_VOCAB, train_spm, write_tokenized

SEQ_LEN = 24  # every fixture document is longer: samples of one length, one batch
NUM_SAMPLES = 6


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    return train_spm(tmp_path_factory.mktemp("spm"))


def _data(tmp_path, spm_path):
    """The same documents as text (.jsonl) and as token ids with EOS (an indexed dataset)."""
    texts = data_documents(10, seed=3)
    (tmp_path / "valid.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(tmp_path / "valid.jsonl"), write_tokenized(tmp_path / "valid", texts, spm_path)


def _reference_nll(model, samples) -> float:
    """Summed next-token loss of equal-length samples in one batch, without hooks."""
    tokens = torch.as_tensor(np.stack(samples))  # (B, T)
    with torch.no_grad():
        logits = model(tokens[:, :-1]).logits.double()  # (B, T - 1, V)
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum").item()


def _piece_bytes(spm_path, ids) -> int:
    """UTF-8 bytes of token ids counted piece by piece (byte pieces 1, control pieces such as EOS 0)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    n = 0
    for i in map(int, ids):
        if sp.is_byte(i):
            n += 1
        elif not sp.is_control(i):
            n += len(sp.id_to_piece(i).replace("\u2581", " ").encode())
    return n


def _zeroed_wo_copy(model, heads):
    """A copy of the model with each listed head's input columns of wo zeroed (no hooks)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, layer in m.layers.items():
            hd = layer.attention.head_dim
            for h in heads[int(name)]:
                layer.attention.wo.weight[:, h * hd:(h + 1) * hd] = 0.0
    return m


def test_ablation_matches_independent_computation(variant, tmp_path, spm_path):
    text_data, _ = _data(tmp_path, spm_path)
    cfg = Config(model=small_model_cfg(variant, vocab_size=MODEL_VOCAB))
    model = build_seeded(cfg.model).eval()
    ckpt = save_model_checkpoint(model, cfg, tmp_path / "step_1", tokenizer=str(spm_path))
    a = ablate(str(ckpt), [text_data], num_samples=NUM_SAMPLES, seq_len=SEQ_LEN, seed=7, max_batch_tokens=100)
    d = diagnose(str(ckpt), [text_data], num_samples=NUM_SAMPLES, seq_len=SEQ_LEN, max_batch_tokens=100)
    assert torch.equal(a.importance, d.importance)  # diagnosis of the same documents
    assert a.orders == masking_orders(d.importance, 7)
    ordered = d.importance.gather(1, torch.tensor(a.orders["importance"]))
    assert (ordered.diff(dim=1) >= 0).all()  # least important first

    from megasink.hf.tokenizer import load_encoder

    samples = list(iter_samples(DocumentSource([text_data]), NUM_SAMPLES, SEQ_LEN, encode=load_encoder(str(spm_path))))
    assert a.num_samples == len(samples) and a.num_targets == sum(len(s) - 1 for s in samples)
    base = _reference_nll(model, samples)
    assert abs(a.loss["importance"][0] - base / a.num_targets) <= 1e-6  # k = 0: the plain validation loss
    assert a.loss["random"][0] == a.loss["importance"][0]
    H = cfg.model.n_heads
    for order in ("importance", "random"):
        for k in range(1, H):
            heads = [row[:k] for row in a.orders[order]]
            ref = _reference_nll(_zeroed_wo_copy(model, heads), samples) / a.num_targets
            assert abs(a.loss[order][k] - ref) <= 1e-5, (order, k, a.loss[order][k], ref)
            assert abs(a.loss[order][k] - a.loss[order][0]) > 1e-4  # masking changed the loss
    assert a.num_bytes == sum(_piece_bytes(spm_path, s[1:]) for s in samples)
    assert a.bpb["importance"][0] == pytest.approx(a.loss["importance"][0] * a.num_targets / math.log(2)
                                                   / a.num_bytes, rel=1e-12)
    with masked_heads(model, [[0], [1]]):
        pass
    assert _reference_nll(model, samples) == base  # hooks are gone after the block


def test_hf_directory_and_cli_outputs(tmp_path, spm_path, capsys):
    _, token_data = _data(tmp_path, spm_path)
    cfg = Config(model=small_model_cfg("sink", vocab_size=MODEL_VOCAB))
    ckpt = save_model_checkpoint(build_seeded(cfg.model), cfg, tmp_path / "step_1", tokenizer=str(spm_path))
    assert to_hf_main([str(ckpt), str(tmp_path / "hf"), "--no-progress"]) == 0
    kw = dict(num_samples=NUM_SAMPLES, seq_len=SEQ_LEN)
    from_ckpt, from_hf = ablate(str(ckpt), [token_data], **kw), ablate(str(tmp_path / "hf"), [token_data], **kw)
    assert from_ckpt.num_bytes == from_hf.num_bytes > 0  # decoded by sentencepiece and by the HF tokenizer
    for order in ("importance", "random"):
        assert np.allclose(from_ckpt.loss[order], from_hf.loss[order], atol=1e-5, rtol=0)

    out = tmp_path / "abl"
    assert main([str(ckpt), "--data", token_data, "--out", str(out), "--num-samples", str(NUM_SAMPLES),
                 "--seq-len", str(SEQ_LEN)]) == 0
    res = json.loads((out / "ablation.json").read_text())
    assert res["k"] == [0, 1, 2, 3] and np.allclose(res["loss"]["importance"], from_ckpt.loss["importance"])
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "loss(importance)" in printed and "bpb(random)" in printed
    assert (out / "summary.txt").read_text() in printed
    assert main([str(ckpt), "--data", token_data, "--out", str(out), "--importance", str(out / "ablation.json"),
                 "--seq-len", str(SEQ_LEN)]) == 0  # its importance is read back
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"importance": [[1.0, 2.0]]}))
    assert main([str(ckpt), "--data", token_data, "--out", str(out), "--importance", str(bad)]) == 2
    assert "the model has 2 x 4 heads" in capsys.readouterr().err


def test_fewer_samples_than_asked_and_dormant_heads_are_named(tmp_path, spm_path, capsys):
    """ablate_heads.py once said nothing when it found 87 of the 200 samples asked for."""
    from megasink.heatmap import dormant_mask

    _, token_data = _data(tmp_path, spm_path)  # 10 documents
    cfg = Config(model=small_model_cfg("sink", vocab_size=MODEL_VOCAB))
    ckpt = save_model_checkpoint(build_seeded(cfg.model), cfg, tmp_path / "step_1", tokenizer=str(spm_path))
    out = tmp_path / "abl"
    assert main([str(ckpt), "--data", token_data, "--out", str(out), "--seq-len", str(SEQ_LEN)]) == 0
    captured = capsys.readouterr()
    assert "note: found 10 of the 200 samples asked for (--num-samples)" in captured.err
    assert "data: 10 samples (found only 10 of the 200 asked for), <= 24 tokens each" in captured.out
    res = json.loads((out / "ablation.json").read_text())
    per_layer = [sum(row) for row in dormant_mask(res["importance"])]
    assert res["dormant_per_layer"] == per_layer
    assert f"per layer {' '.join(map(str, per_layer))}" in captured.out
