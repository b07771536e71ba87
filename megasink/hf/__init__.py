"""Hugging Face interoperability: export megasink checkpoints, import Llama-family models (Llama,
Mistral, Qwen2, Qwen3).

    from megasink.hf import convert_checkpoint, import_model
    convert_checkpoint("runs/x/checkpoints/step_100", "hf/x")           # -> HF directory
    model, cfg, report = import_model("hf/llama", attention="sink")     # -> megasink Transformer

Vanilla models export as their family's stock class (``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
...); sink and gated models carry the modeling code in ``megasink/hf/remote/``
(``trust_remote_code=True``). See mapping.py for the names.
"""
from megasink.hf.export import convert_checkpoint, export_model
from megasink.hf.importer import ImportReport, convert_hf_dir, import_model, is_hf_dir
from megasink.hf.mapping import UnsupportedModelError

__all__ = ["convert_checkpoint", "export_model", "convert_hf_dir", "import_model", "is_hf_dir", "ImportReport",
           "UnsupportedModelError"]
