"""Fine-tuning data: prompt/response and chat records -> tokens + a loss mask, against the
tokenizers' own encode and transformers' own chat template and assistant mask; Megatron's reader
still reads the tokens; packing, the loader's targets, blending with plain text."""
import json
import os

import numpy as np
import pytest

from data_fixtures import data_hf_tokenizer, data_tokenizer_model, data_write_jsonl, write_hf_bpe_tokenizer

transformers = pytest.importorskip("transformers")

CHAT_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Llama 3's template, with {% generation %} marks so transformers computes its own assistant mask (the
# reference); megasink does not read the marks
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|eot_id|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

PAIRS = [{"prompt": f"Question {i}: what is {i} + {i}?", "response": f" The sum is {2 * i}, since {i} + {i} = {2 * i}."}
         for i in range(40)]
CHATS = [{"messages": [{"role": "system", "content": "You reason step by step."},
                       {"role": "user", "content": f"What is {i} times 3?"},
                       {"role": "assistant", "content": f"{i} times 3 is {3 * i}."},
                       {"role": "user", "content": "And plus one?"},
                       {"role": "assistant", "content": f"That gives {3 * i + 1}."}]} for i in range(30)]


def chat_tokenizer(tmp_path) -> str:
    """The llama3-style test BPE with Llama 3's chat special tokens and template."""
    import tokenizers

    from data_fixtures import data_docstring_corpus

    out = write_hf_bpe_tokenizer(str(tmp_path / "chat-tok"), data_docstring_corpus(), 1000, "llama3")
    tok = tokenizers.Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    tok.add_special_tokens(CHAT_SPECIALS)
    tok.save(os.path.join(out, "tokenizer.json"))
    cfg_path = os.path.join(out, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg["chat_template"] = CHAT_TEMPLATE
    json.dump(cfg, open(cfg_path, "w"))
    return out


def _preprocess(tmp_path, rows, tokenizer, fmt, workers=0, name="sft", **kw):
    from megasink.data.preprocess import PreprocessConfig, preprocess

    src = data_write_jsonl(tmp_path / f"{name}.jsonl", rows)
    prefix = str(tmp_path / name / "out")
    preprocess(PreprocessConfig(inputs=[src], tokenizer=tokenizer, output_prefix=prefix, format=fmt, workers=workers,
                                progress=False, **kw))
    return prefix


def _documents(prefix):
    """[(tokens, mask)] per document, read with megasink's reader (and the tokens with Megatron's)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexed

    from megasink.data.indexed import IndexedDataset

    tokens, masks = IndexedDataset(prefix), IndexedDataset(prefix + ".lossmask")
    theirs = MegatronIndexed(prefix, multimodal=False, mmap=True)
    docs = []
    for i in range(len(tokens)):
        t, m = np.asarray(tokens[i]), np.asarray(masks[i])
        assert np.array_equal(np.asarray(theirs[i]), t) and m.dtype == np.uint8 and len(m) == len(t)
        docs.append((t.tolist(), m.tolist()))
    return docs


@pytest.mark.parametrize("kind", ["huggingface", "sentencepiece"])
def test_prompt_response_documents_match_the_tokenizers_own_encode(tmp_path, kind):
    from megasink.data.tokenizer import load_tokenizer

    path = data_hf_tokenizer("llama3") if kind == "huggingface" else data_tokenizer_model()
    prefix = _preprocess(tmp_path, PAIRS, path, "prompt_response")
    docs = _documents(prefix)
    assert len(docs) == len(PAIRS)
    if kind == "huggingface":
        import tokenizers

        ref = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        enc = lambda t: ref.encode(t, add_special_tokens=False).ids  # noqa: E731
        bos = [ref.token_to_id("<|begin_of_text|>")]
        eos = ref.token_to_id("<|end_of_text|>")
    else:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=path)
        enc, bos, eos = sp.encode, [], sp.eos_id()  # sentencepiece frames documents without BOS
    for (ids, mask), pair in zip(docs, PAIRS):
        p, r = enc(pair["prompt"]), enc(pair["response"])
        assert ids == bos + p + r + [eos]
        assert mask == [0] * (len(bos) + len(p)) + [1] * (len(r) + 1)  # the response and its EOS
    meta = json.load(open(prefix + ".meta.json"))
    assert meta["records"] == "prompt_response" and meta["loss_mask"] is True and "lossmask" in meta["notes"]
    assert load_tokenizer(path).vocab_size <= 65536


def test_chat_mask_equals_transformers_assistant_mask(tmp_path):
    tok_dir = chat_tokenizer(tmp_path)
    prefix = _preprocess(tmp_path, CHATS, tok_dir, "chat", valid_fraction=0.0)
    docs = _documents(prefix)
    ref = transformers.AutoTokenizer.from_pretrained(tok_dir)
    eos = ref.convert_tokens_to_ids("<|end_of_text|>")
    for (ids, mask), chat in zip(docs, CHATS):
        want = ref.apply_chat_template(chat["messages"], tokenize=True, return_dict=True,
                                       return_assistant_tokens_mask=True)
        assert ids == list(want["input_ids"]) + [eos]  # the separator EOS, not learned
        assert mask == list(want["assistant_masks"]) + [0]
        assert sum(mask) > 0 and mask[0] == 0


def test_output_is_the_same_bytes_for_any_worker_count(tmp_path):
    tok_dir = chat_tokenizer(tmp_path)
    files = []
    for workers in (0, 2):
        prefix = _preprocess(tmp_path, CHATS, tok_dir, "chat", workers=workers, name=f"w{workers}",
                             valid_fraction=0.2, chunk_docs=7)
        folder = os.path.dirname(prefix)  # the data files (meta.json names each run's own input file)
        files.append({f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder) if "meta" not in f})
    assert files[0] == files[1] and "out_valid.lossmask.bin" in files[0] and len(files[0]) == 8


def test_bad_records_are_counted_and_bad_formats_refused(tmp_path):
    from megasink.data.preprocess import PreprocessConfig, preprocess
    from megasink.data.tokenizer import TokenizerError

    rows = PAIRS[:5] + [{"prompt": "no response"}, {"prompt": 3, "response": "x"}]
    src = data_write_jsonl(tmp_path / "bad.jsonl", rows)
    out = preprocess(PreprocessConfig(inputs=[src], tokenizer=data_hf_tokenizer("llama3"), format="prompt_response",
                                      output_prefix=str(tmp_path / "bad" / "out"), workers=0, progress=False))
    assert out.train.documents == 5 and out.skipped["invalid_record"] == 2
    with pytest.raises(ValueError, match="--min-chars filter text documents; --format prompt_response"):
        _preprocess(tmp_path, PAIRS, data_hf_tokenizer("llama3"), "prompt_response", name="filters", min_chars=10)
    with pytest.raises(TokenizerError, match="has no chat template"):
        _preprocess(tmp_path, CHATS, data_hf_tokenizer("llama3"), "chat", name="notemplate")
    with pytest.raises(TokenizerError, match="needs a Hugging Face tokenizer directory with a chat template"):
        _preprocess(tmp_path, CHATS, data_tokenizer_model(), "chat", name="spm")


def test_packed_windows_and_targets_follow_the_mask_and_blend_with_text(tmp_path):
    """Packed windows carry the mask; the loader's targets are -100 exactly where the target
    token is a prompt token; a blend with a plain-text corpus keeps every target of its samples."""
    from megasink.config import DataConfig
    from megasink.data import build_dataset, build_loader
    from megasink.data.preprocess import PreprocessConfig, preprocess

    tok = data_hf_tokenizer("llama3")
    sft = _preprocess(tmp_path, PAIRS, tok, "prompt_response")
    text_src = data_write_jsonl(tmp_path / "text.jsonl", [{"text": p["prompt"] + p["response"]} for p in PAIRS])
    text = str(tmp_path / "text" / "out")
    preprocess(PreprocessConfig(inputs=[text_src], tokenizer=tok, output_prefix=text, workers=0, progress=False))
    docs = _documents(sft)
    stream_tokens = np.concatenate([d[0] for d in docs])
    stream_mask = np.concatenate([d[1] for d in docs])
    ds = build_dataset(DataConfig(path=[sft], tokenizer=tok), 32, 2048, seed=0)
    for i in range(len(ds)):
        s = ds[i]
        assert np.array_equal(s["tokens"], stream_tokens[i * 32:(i + 1) * 32 + 1])
        assert np.array_equal(s["loss_mask"], stream_mask[i * 32:(i + 1) * 32 + 1])
    batch = build_loader(ds, 4, seed=0).next_batch()
    masks = np.stack([ds[int(i)]["loss_mask"] for i in build_loader(ds, 4, seed=0).next_indices()])
    assert np.array_equal(batch["targets"].numpy() == -100, masks[:, 1:] == 0)
    assert (batch["targets"] == -100).any() and (batch["targets"] != -100).any()
    blend = build_dataset(DataConfig(path=[f"0.5 {sft}", f"0.5 {text}"], tokenizer=tok), 32, 2048, seed=0)
    loader = build_loader(blend, 8, seed=0)
    batch = loader.next_batch()
    from_text = [blend.locate(int(i))[0] == 1 for i in loader.last_indices]
    assert any(from_text) and not all(from_text)
    for row, text_row in zip(batch["targets"], from_text):
        assert bool((row != -100).all()) if text_row else bool((row == -100).any())
