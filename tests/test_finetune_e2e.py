"""Fine-tuning an existing model the paper's way, end to end on CPU, as the README's "Fine-tuning an
existing model" section runs it: a Llama-3.2-shaped Hugging Face model (llama3 RoPE, tied
embeddings, GQA) with a byte-level BPE chat tokenizer -> convert_from_hf.py --attention sink (and
gated) -> chat data with a loss mask -> diagnose_heads.py --top-m 3 -> fine-tuning with the 3 shared
heads per layer out of the CV, lambda 1e-2, under tp2 x dp2 ZeRO-1, saved sharded -> resumed under
pp2 with the same numbers -> exported -> megasink eval on an offline task."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from test_data_sft import chat_tokenizer
from train_utils import losses, train_worker

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _run(*args, timeout=600):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc.stdout + proc.stderr


def llama32_like(tmp_path) -> Path:
    """A random Llama-3.2-shaped HF model (llama3 RoPE, tied embeddings, 8 heads / 2 kv) with the
    chat tokenizer, saved as a hub download is."""
    tok_dir = Path(chat_tokenizer(tmp_path))
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=True, rope_parameters=rope, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # attention far from uniform, so heads differ in importance
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    out = tmp_path / "Llama-3.2-like"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.slow
def test_finetune_an_existing_model_end_to_end(tmp_path):
    hf = llama32_like(tmp_path)
    for attention in ("sink", "gated"):
        out = _run("tools/convert_from_hf.py", hf, tmp_path / f"ckpt-{attention}", "--attention", attention,
                   "--seq-len", 64, "--no-progress")
        assert "largest logit change" in out
    ckpt = tmp_path / "ckpt-sink"
    rows = [{"messages": [{"role": "user", "content": f"Problem {i}: what is {i} times {i % 7 + 2}? Explain."},
                          {"role": "assistant", "content": f"We multiply {i} by {i % 7 + 2} step by step: the "
                                                           f"result is {i * (i % 7 + 2)}, so the answer is "
                                                           f"{i * (i % 7 + 2)}."}]} for i in range(120)]
    data_src = tmp_path / "reasoning.jsonl"
    data_src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefix = tmp_path / "data" / "chat"
    _run("tools/preprocess_data.py", "--input", data_src, "--format", "chat", "--tokenizer", hf, "--output-prefix",
         prefix, "--valid-fraction", 0.2, "--workers", 1, "--no-progress")
    _run("tools/diagnose_heads.py", ckpt, "--data", f"{prefix}_valid", "--top-m", 3, "--out", tmp_path / "diag")
    diag = json.loads((tmp_path / "diag" / "importance.json").read_text())
    assert [len(layer) for layer in diag["shared_heads"]] == [3, 3]

    from megasink.checkpoint import resolve_checkpoint_dir

    config = str(resolve_checkpoint_dir(ckpt) / "config.yaml")  # the converted model's own model section
    common = [f"data.path=[{prefix}]", f"data.tokenizer={hf}", f"train.init_from={ckpt}", "train.resume=auto",
              f"aux_loss.shared_heads={tmp_path / 'diag' / 'importance.json'}", "aux_loss.coef=1e-2",
              "train.steps=4", "train.save_interval=2", "train.keep_last=5", "train.micro_batch_size=1",
              "train.global_batch_size=4", "train.warmup_steps=1", "train.lr=1e-3", "train.min_lr=1e-4",
              "train.log_interval=1", "train.progress=false", "train.eval_interval=0"]
    tp_dp = tmp_path / "ft-tp2dp2"
    run_distributed(train_worker, 4, config, common + [f"run_dir={tp_dp}", "parallel.tp=2", "parallel.zero_stage=1"])
    step2 = tp_dp / "checkpoints" / "step_2"
    assert (step2 / "manifest.json").exists()  # every rank wrote its own part
    pp = tmp_path / "ft-pp2"
    run_distributed(train_worker, 2, config, common + [f"run_dir={pp}", "parallel.pp=2", f"train.resume={step2}"])
    assert sorted(losses(pp)) == [3, 4]
    for key in ("loss", "aux_loss", "grad_norm"):
        a, b = losses(tp_dp, key), losses(pp, key)
        for step in (3, 4):
            # a converted sink model starts with every gate ~1 (each sink takes at most 1e-3), so its
            # aux loss is ~1e-13 here: fp32 rounding decides its relative error; absolute 1e-9
            assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]) + (1e-9 if key == "aux_loss" else 0), (
                key, step, a[step], b[step])
    metrics = [json.loads(line) for line in (tp_dp / "metrics.jsonl").read_text().splitlines()]
    assert all("importance_shared_mean" in m for m in metrics if "loss" in m)

    export = tmp_path / "hf-export"
    _run("tools/convert_to_hf.py", tp_dp, export, "--no-progress")
    exported = transformers.AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    import megasink

    model, _ = megasink.load_checkpoint(tp_dp)
    tokens = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (exported(tokens).logits - model(tokens).logits).abs().max().item()
    assert diff < 1e-4, diff

    tasks = tmp_path / "tasks"
    _run("tools/make_eval_task.py", f"{prefix}_valid", "--out", tasks, "--model", tp_dp, "--num-docs", 20,
         "--context-words", 12, "--passage-words", 4)
    _run("-m", "megasink.eval", tp_dp, "--include-path", tasks, "--tasks", "megasink_next_passage",
         "--out", tmp_path / "eval", "--device", "cpu")
    result = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]["megasink_next_passage"]
    assert 0.0 <= result["acc,none"] <= 1.0
