#!/usr/bin/env python
"""Local lm-evaluation-harness tasks from a validation set (see megasink/eval/tasks.py)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megasink.eval.tasks import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
