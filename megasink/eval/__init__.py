"""Evaluation beyond the validation loss.

- harness.py   ``megasink eval``: lm-evaluation-harness on a checkpoint through its HF export
- tasks.py     tools/make_eval_task.py: local (offline) tasks from a validation set
- scoring.py   megasink's own rolling-window bits per byte (the reference for the BPB task)
- diagnose.py  tools/diagnose_heads.py: per-head importance of a trained model over documents
- ablation.py  tools/ablate_heads.py: validation loss with the k least important heads per layer masked
- inputs.py    what diagnosis and ablation read: the model, its trained length, documents, options
- background.py  train.lm_eval_tasks: ``megasink eval`` of saved checkpoints while training goes on
"""
