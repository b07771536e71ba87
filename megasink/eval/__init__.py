"""Evaluation beyond the validation loss.

- harness.py   ``megasink eval``: lm-evaluation-harness on a checkpoint through its HF export
- tasks.py     tools/make_eval_task.py: local (offline) tasks from a validation set
- scoring.py   megasink's own rolling-window bits per byte (the reference for the BPB task)
- ablation.py  tools/ablate_heads.py: validation loss with the k least important heads per layer masked
- background.py  train.lm_eval_tasks: ``megasink eval`` of saved checkpoints while training goes on
"""
