#!/usr/bin/env python
"""Per-head importance of a megasink checkpoint or HF model directory (see megasink/eval/diagnose.py)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megasink.eval.diagnose import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
